"""A stage's identity (issue 16, point 1): what changes what a stage learns changes its fingerprint and every one
downstream of it, and nothing upstream; where and how often it runs and saves changes nothing. A stage is retrained
exactly when no FINISHED run has its fingerprint (the end-to-end rule: `test_pipeline`, `test_resume`), so each
item is checked here on the fingerprints themselves, with real data folders for the data's identity, and the
things that must change nothing are also rerun end to end against a finished chain."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from kdpipe.data import prepare_data
from kdpipe.data.synthetic import write_image_folder
from kdpipe.driver.runner import run_job
from kdpipe.job.spec import DataSpec
from kdpipe.methods import METHODS
from kdpipe.plan import load_plan
from tests.conftest import write_job
from tests.test_data import write_small_cifar

JOB = {
    "name": "chain",
    "data": {"source": "synthetic"},
    "stages": [
        {"name": "teacher", "model": "resnet14", "epochs": 2, "workers": {}},
        {"name": "assistant", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 1, "workers": {}},
        {"name": "student", "model": "resnet8", "teachers": ["assistant"], "method": "takd", "epochs": 1, "params": {}},
    ],
}
EVERY = {"teacher", "assistant", "student"}


def changed_stages(tmp_path, change, base: dict = JOB) -> set[str]:
    before = load_plan(write_job(tmp_path / "before.yaml", base), check_paths=False).fingerprints("data")
    job = copy.deepcopy(base)
    change(job)
    after = load_plan(write_job(tmp_path / "after.yaml", job), check_paths=False).fingerprints("data")
    return {name for name in before if before[name] != after[name]}


CHANGES = {
    "the job's seed": (lambda j: j.update(seed=7), EVERY),
    "batch size": (lambda j: j["data"].update(batch_size=32), EVERY),
    "image size": (lambda j: j["data"].update(image_size=48), EVERY),
    "augmentation": (lambda j: j["data"].update(augment=False), EVERY),
    "bad samples": (lambda j: j["data"].update(bad_samples="skip"), EVERY),
    "loader workers (shards deal samples out by worker)": (lambda j: j["data"].update(loader_workers=3), EVERY),
    "the assistant's worker count": (lambda j: j["stages"][1]["workers"].update(count=4), {"assistant", "student"}),
    "the student's method params": (lambda j: j["stages"][2]["params"].update(temperature=2), {"student"}),
    # Issue 15: FKD's top-k soft labels approximate the teachers: the stages that read them (kd, takd) change.
    "a top-k teacher cache": (lambda j: j.update(teacher_cache={"top_k": 5}), {"assistant", "student"}),
    # Issue 13, point 4: a searched stage is its config, its search block and its upstream.
    "a search added to the assistant": (lambda j: j["stages"][1].update(search=SEARCH), {"assistant", "student"}),
}
SEARCH = {"trials": 4, "space": {"optimizer.lr": {"distribution": "loguniform", "low": 0.001, "high": 0.1}}}
SEARCHED = copy.deepcopy(JOB)
SEARCHED["stages"][1]["search"] = SEARCH
SEARCH_CHANGES = {
    "its space": lambda j: j["stages"][1]["search"]["space"]["optimizer.lr"].update(high=0.2),
    "a searched path": lambda j: j["stages"][1]["search"]["space"].update(
        {"params.temperature": {"distribution": "choice", "values": [2, 4]}}
    ),
    "its budget": lambda j: j["stages"][1]["search"].update(trials=8),
    "its scheduler": lambda j: j["stages"][1]["search"].update(scheduler={"reduction_factor": 2}),
    "its searcher's seed": lambda j: j["stages"][1]["search"].update(seed=3),
    "its upstream": lambda j: j["stages"][0].update(epochs=3),
}


@pytest.mark.parametrize("item", sorted(SEARCH_CHANGES))
def test_a_changed_search_searches_again_and_retrains_downstream(tmp_path, item):
    expected = EVERY if item == "its upstream" else {"assistant", "student"}
    assert changed_stages(tmp_path, SEARCH_CHANGES[item], SEARCHED) == expected


@pytest.mark.parametrize("item", sorted(CHANGES))
def test_what_a_stage_learns_from_changes_it_and_downstream(tmp_path, item):
    change, expected = CHANGES[item]
    assert changed_stages(tmp_path, change) == expected


def test_a_raised_method_version_retrains_its_stages_and_downstream(tmp_path, monkeypatch):
    before = load_plan(write_job(tmp_path / "job.yaml", JOB)).fingerprints("data")
    monkeypatch.setattr(METHODS["kd"], "version", METHODS["kd"].version + 1)  # as if kd.py fixed its loss
    after = load_plan(tmp_path / "job.yaml").fingerprints("data")
    assert {name for name in before if before[name] != after[name]} == {"assistant", "student"}


SAME = {
    "placement": lambda j: j["stages"][0].update(workers={"count": 2, "placement": "SPREAD"}),
    "CPUs and GPUs per worker": lambda j: j["stages"][1].update(workers={"cpus": 2, "gpus": 0}),
    "checkpoint cadence": lambda j: j.update(checkpoint={"every_steps": 5, "every_minutes": 1, "keep": 3}),
    "tracking URI": lambda j: j.update(tracking={"uri": "http://mlflow:5000", "experiment": "kdpipe"}),
    "workdir": lambda j: j.update(workdir="/elsewhere"),
    # Issue 15: the exact teacher-output cache, off for the job or for one stage, changes no fingerprint.
    "the teacher cache off": lambda j: j.update(teacher_cache="off"),
    "the teacher cache off for a stage": lambda j: j["stages"][1].update(teacher_cache="off"),
}


@pytest.mark.parametrize("item", sorted(SAME))
def test_where_and_how_often_it_runs_changes_nothing(tmp_path, item):
    assert changed_stages(tmp_path, SAME[item]) == set()


def test_loader_workers_change_nothing_where_data_is_read_from_memory(tmp_path):
    in_memory = {**JOB, "data": {"source": "fashion-mnist", "path": "anywhere"}}
    assert changed_stages(tmp_path, lambda j: j["data"].update(loader_workers=3), in_memory) == set()


def test_an_image_folder_is_identified_by_every_file(tmp_path):
    """One image replaced by another of the same name: the per-class counts are unchanged, the identity is not;
    the same folder copied elsewhere keeps it (modification times preserved)."""
    write_image_folder(tmp_path / "a", classes=2, size=8, train_size=10, val_size=4, seed=0)
    spec = DataSpec(source="imagefolder", path=str(tmp_path / "a"))
    before = prepare_data(spec).identity
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copytree keeps modification times
    assert prepare_data(DataSpec(source="imagefolder", path=str(tmp_path / "b"))).identity == before
    image = tmp_path / "a" / "train" / "class_01" / "000002.jpg"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image, quality=50)
    assert len(list((tmp_path / "a" / "train" / "class_01").iterdir())) == 5
    assert prepare_data(spec).identity != before


def test_a_cifar_copy_is_identified_by_its_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    write_small_cifar(tmp_path / "a")
    identity = prepare_data(DataSpec(source="cifar", path=str(tmp_path / "a"))).identity
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert prepare_data(DataSpec(source="cifar", path=str(tmp_path / "moved"))).identity == identity
    (tmp_path / "b").mkdir()
    folder = write_small_cifar(tmp_path / "b")
    batch = folder / "data_batch_3"
    data = bytearray(batch.read_bytes())
    data[-10] ^= 1  # one bit of one image (or label) differs
    batch.write_bytes(bytes(data))
    assert prepare_data(DataSpec(source="cifar", path=str(tmp_path / "b"))).identity != identity


def test_the_finished_chain_is_reused_wherever_and_however_often_it_runs(finished_chain):
    """End to end: the finished chain, run again with another placement, checkpoint cadence, workdir, the same
    store under another spelling of its URI, comments and another key order: every stage is reused."""
    root, plan, first = finished_chain
    job = plan.job.model_dump()
    for stage in job["stages"]:
        stage["workers"]["placement"] = "SPREAD"
    job["checkpoint"] = {"every_steps": 3, "every_minutes": 1, "keep": 5, "max_restarts": 1}
    job["workdir"] = str(root / "elsewhere")
    relative = os.path.relpath(plan.job.tracking.uri.removeprefix("sqlite:///"), root)
    job["tracking"]["uri"] = f"sqlite:///{relative}"  # the same file, from the folder kdpipe runs in
    text = "# the same job, written differently\n" + yaml.safe_dump(
        {key: job[key] for key in reversed(list(job))}, sort_keys=False
    )
    (root / "respelled.yaml").write_text(text)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        outcomes = run_job(load_plan(root / "respelled.yaml"))
    finally:
        os.chdir(cwd)
    assert {name: o.status for name, o in outcomes.items()} == dict.fromkeys(first, "reused")
    assert {name: o.run_id for name, o in outcomes.items()} == {name: o.run_id for name, o in first.items()}


def test_fingerprints_are_those_of_the_layout_before_the_package_moved():
    """Runs made before `pipeline` became `kdpipe` (df79ee0) are reused: every job it shipped has fingerprints, with a
    fixed data identity, equal to the ones that commit's code computed (tests/data/fingerprints-df79ee0.json, written
    by running its `pipeline.plan.load_plan(job, check_paths=False).fingerprints("data-identity")` on each job);
    all but those of stages whose method's version was raised since (every method was at version 1 then), and of
    their students, which must train again."""
    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "tests/data/fingerprints-df79ee0.json").read_text())
    before = {f"{job}:{name}": print_ for job, prints in saved.items() for name, print_ in prints.items()}
    kept, changed = {}, {}
    for job in sorted(root.glob("jobs/**/*.yaml")):
        if str(job.relative_to(root)) not in saved:  # a job shipped since
            continue
        plan = load_plan(job, check_paths=False)
        raised = {name for name, stage in plan.stages.items() if METHODS[stage.spec.method].version > 1}
        retrained = set().union(*(plan.downstream(name) for name in raised))
        for name, fingerprint in plan.fingerprints("data-identity").items():
            (changed if name in retrained else kept)[f"{job.relative_to(root)}:{name}"] = fingerprint
    assert set(kept) | set(changed) == set(before)
    assert kept == {key: before[key] for key in kept}
    assert changed and all(before[key] != print_ for key, print_ in changed.items())
