"""Malformed job files: each gives one line naming the field (or file) and what was expected, exit 2, no traceback."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from kdpipe.cli import main
from kdpipe.errors import UserError

GOOD = {
    "name": "bad",
    "data": {"source": "synthetic"},
    "stages": [
        {"name": "teacher", "model": "resnet8", "epochs": 1},
        {"name": "student", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 1},
    ],
}


def edit(change):
    job = copy.deepcopy(GOOD)
    change(job)
    return yaml.safe_dump(job)


CASES = {
    "unknown field": (edit(lambda j: j["stages"][0].update(lr=0.1)), ["stages[0].lr", "unknown field", "epochs"]),
    "wrong type": (edit(lambda j: j["stages"][0].update(epochs="five")), ["stages[0].epochs", "integer", "'five'"]),
    "unknown model": (edit(lambda j: j["stages"][1].update(model="resnet9000")), ["stages[1].model", "resnet9000"]),
    "unknown teacher": (edit(lambda j: j["stages"][1].update(teachers=["techer"])), ["stages[1].teachers", "techer"]),
    "cycle": (edit(lambda j: j["stages"][0].update(teachers=["student"], method="kd")), ["cycle", "teacher"]),
    "missing data path": (
        edit(lambda j: j.update(data={"source": "imagefolder", "path": "/no/such/imagenet"})),
        ["data.path", "/no/such/imagenet"],
    ),
    "negative epochs": (
        edit(lambda j: j["stages"][1].update(epochs=-3)),
        ["stages[1].epochs", "greater than or equal to 0"],
    ),
    "zero workers": (edit(lambda j: j["stages"][0].update(workers={"count": 0})), ["stages[0].workers.count"]),
    "empty stages": (edit(lambda j: j.update(stages=[])), ["stages", "at least 1"]),
    "yaml syntax": ("name: bad\nstages: [\n  - {name: a\n", ["YAML syntax error", ":"]),
    "duplicate name": (edit(lambda j: j["stages"][1].update(name="teacher")), ["stages[1].name", "duplicate"]),
    "unknown method": (edit(lambda j: j["stages"][1].update(method="kdd")), ["stages[1].method", "kdd", "kd"]),
    "unknown method param": (
        edit(lambda j: j["stages"][1].update(params={"temprature": 4})),
        ["stages[1].params.temprature", "method 'kd'", "temperature"],
    ),
    "bad method param type": (
        edit(lambda j: j["stages"][1].update(params={"temperature": -1})),
        ["stages[1].params.temperature", "greater than 0"],
    ),
    "unknown param of a seed method": (
        edit(lambda j: j["stages"][1].update(method="infoflow", params={"critial_weight": 50})),
        ["stages[1].params.critial_weight", "method 'infoflow'", "critical_weight"],
    ),
    "unknown distillation path": (
        edit(lambda j: j["stages"][1].update(method="adaptive", params={"paths": ["at", "crd"]})),
        ["stages[1].params.paths.1", "'crd'"],
    ),
    "weight of a path not taken": (
        edit(lambda j: j["stages"][1].update(method="adaptive", params={"paths": ["at"], "weights": {"st": 2}})),
        ["stages[1].params.weights", "st"],
    ),
    "dgkd dropping every teacher": (
        edit(
            lambda j: j["stages"].append(
                {**j["stages"][1], "name": "last", "teachers": ["teacher", "student"], "method": "dgkd"}
                | {"params": {"drop_prob": 0.7}}
            )
        ),
        ["stages[2].params.drop_prob", "never all"],
    ),
    "kd without teacher": (edit(lambda j: j["stages"][1].update(teachers=[])), ["stages[1].teachers", "'kd'"]),
    "missing required field": (edit(lambda j: j["stages"][0].pop("model")), ["stages[0].model", "missing"]),
    "not a mapping": ("- just\n- a list\n", ["mapping"]),
    "bad zero stage": (edit(lambda j: j["stages"][0].update(deepspeed={"zero_stage": 3})), ["zero_stage"]),
    "unknown teacher cache mode": (edit(lambda j: j.update(teacher_cache="sometimes")), ["teacher_cache", "'auto'"]),
    "top-k of none": (edit(lambda j: j["stages"][1].update(teacher_cache={"top_k": 0})), ["stages[1].teacher_cache"]),
}


def search(space: dict, **settings) -> str:
    """The student searched over `space`, 4 trials unless `settings` say otherwise."""
    return edit(lambda j: j["stages"][1].update(search={"trials": 4, "space": space, **settings}))


LR = {"distribution": "loguniform", "low": 0.001, "high": 0.1}
WHERE = "stages[1].search"
CASES |= {  # issue 13, point 5
    "search: unknown path": (search({"params.temprature": LR}), [f"{WHERE}.space.params.temprature", "temperature"]),
    "search: path to a word": (
        search({"model": {"distribution": "uniform", "low": 1, "high": 2}}),
        [f"{WHERE}.space.model", "valid string"],
    ),
    "search: path to fields": (search({"optimizer": LR}), [f"{WHERE}.space.optimizer", "valid dictionary"]),
    "search: not searchable": (search({"workers.count": LR}), [f"{WHERE}.space.workers.count", "not searchable"]),
    "search: bad choice": (
        search({"deepspeed.zero_stage": {"distribution": "choice", "values": [0, 3]}}),
        [f"{WHERE}.space.deepspeed.zero_stage", "searching 3"],
    ),
    "search: empty space": (search({}), [f"{WHERE}.space", "at least 1"]),
    "search: no trials": (search({"optimizer.lr": LR}, trials=0), [f"{WHERE}.trials", "greater than or equal to 1"]),
    "search: unknown distribution": (
        search({"optimizer.lr": {"distribution": "normal", "low": 0, "high": 1}}),
        [f"{WHERE}.space.optimizer.lr.distribution", "'normal'", "loguniform"],
    ),
    "search: low above high": (
        search({"optimizer.lr": {"distribution": "uniform", "low": 0.5, "high": 0.1}}),
        [f"{WHERE}.space.optimizer.lr", "low (0.5) is above high (0.1)"],
    ),
    "search: loguniform from 0": (
        search({"optimizer.lr": {"distribution": "loguniform", "low": 0, "high": 0.1}}),
        [f"{WHERE}.space.optimizer.lr", "loguniform needs low > 0"],
    ),
    "search: bound out of range": (
        search({"params.temperature": {"distribution": "uniform", "low": -1, "high": 4}}),
        [f"{WHERE}.space.params.temperature", "greater than 0", "searching -1"],
    ),
    "search: unknown setting": (search({"optimizer.lr": LR}, searcher="grid"), [f"{WHERE}.searcher", "'grid'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_job_file(case, command, tmp_path, capsys):
    text, expected = CASES[case]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and str(path) in lines[0]
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_missing_job_file_names_the_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "cannot read" in err


def test_console_script_exits_2_without_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    path = tmp_path / "job.yaml"
    path.write_text(CASES["cycle"][0])
    done = subprocess.run([sys.executable, "-m", "kdpipe", "run", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cycle" in done.stderr
    assert "Traceback" not in done.stderr


def test_good_job_validates(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["validate", str(path)]) == 0
    assert "teacher -> student" in capsys.readouterr().out


SETTINGS = {  # a bad `--set`: what the one line must name
    "unknown stage": ("stages.pupil.epochs=3", ["--set stages.pupil.epochs", "'pupil'", "teacher, student"]),
    "unknown field": ("stages.student.optimizer.lrr=0.05", ["--set stages.student.optimizer.lrr", "unknown field"]),
    "wrong type": ("data.batch_size=many", ["--set data.batch_size=many", "data.batch_size", "integer"]),
    "not finite": ("stages.teacher.optimizer.lr=.inf", ["--set stages.teacher.optimizer.lr", "finite"]),
    "no value": ("seed", ["--set seed", "PATH=VALUE"]),
    "into a value": ("data.source.x=1", ["--set data.source.x", "single value"]),
    "bad YAML": ("seed=[1", ["--set seed", "YAML syntax error"]),
}


@pytest.mark.parametrize("case", sorted(SETTINGS))
@pytest.mark.parametrize("command", ["validate", "run", "status", "submit"])
def test_a_bad_setting_is_named_in_one_line(case, command, tmp_path, capsys):
    """Issue 17, point 2: a bad `--set` is refused like a bad job file, before anything runs (submit: before
    the cluster is contacted)."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    setting, expected = SETTINGS[case]
    assert main([command, str(path), "--set", setting]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(fragment in lines[0] for fragment in expected), lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_a_setting_is_checked_like_the_file_and_changes_only_its_field(tmp_path):
    from kdpipe.plan import load_plan

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    settings = ["stages.student.optimizer.lr=0.05", "data.batch_size=128", "seed=7", "stages.teacher.epochs=2"]
    plan = load_plan(path, settings=settings)
    assert plan.stages["student"].spec.optimizer.lr == 0.05 and plan.stages["teacher"].spec.epochs == 2
    assert plan.job.data.batch_size == 128 and plan.job.seed == 7 and plan.settings == tuple(settings)
    plain = load_plan(path)
    assert plain.stages["teacher"].spec.optimizer == plan.stages["teacher"].spec.optimizer  # untouched
    assert plain.stages["student"].spec.epochs == plan.stages["student"].spec.epochs
    # A setting can supply what the file lacks; the file's own mistakes stay the file's.
    path.write_text(edit(lambda j: j["stages"][0].update(epochs=0)))
    assert load_plan(path, settings=["stages.teacher.epochs=2"]).stages["teacher"].spec.epochs == 2
    path.write_text(yaml.safe_dump({**GOOD, "seed": -1}))
    with pytest.raises(UserError, match=rf"^{path}: seed"):
        load_plan(path, settings=["stages.student.epochs=2"])
