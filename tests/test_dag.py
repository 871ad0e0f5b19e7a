"""Stage order and fingerprints: pure functions, checked without running anything."""

from __future__ import annotations

import yaml

from kdpipe.plan import load_plan
from tests.conftest import write_job

JOB = {
    "name": "chain",
    "data": {"source": "synthetic"},
    "stages": [
        {"name": "baseline", "model": "resnet8", "epochs": 1},
        {"name": "student", "model": "resnet8", "teachers": ["assistant"], "method": "kd", "epochs": 1},
        {"name": "assistant", "model": "resnet14", "teachers": ["teacher"], "method": "kd", "epochs": 1},
        {"name": "teacher", "model": "resnet20", "epochs": 2},
    ],
}


def test_teachers_come_first_and_ties_keep_file_order(tmp_path):
    plan = load_plan(write_job(tmp_path / "job.yaml", JOB))
    assert plan.order == ["baseline", "teacher", "assistant", "student"]
    assert plan.downstream("teacher") == {"teacher", "assistant", "student"}
    assert plan.downstream("baseline") == {"baseline"}


def test_cosmetic_changes_keep_fingerprints(tmp_path):
    plan = load_plan(write_job(tmp_path / "a.yaml", JOB))
    reordered = {key: JOB[key] for key in reversed(list(JOB))}
    reordered["stages"] = [{k: s[k] for k in reversed(list(s))} for s in JOB["stages"]]
    text = "# a comment\n" + yaml.safe_dump(reordered, sort_keys=False, default_flow_style=True)
    (tmp_path / "b.yaml").write_text(text)
    # Spelling out a default is cosmetic too: the fingerprint hashes the resolved config.
    explicit = yaml.safe_load(text)
    explicit["stages"][1]["params"] = {"temperature": 4.0}
    assert plan.fingerprints("data") == load_plan(tmp_path / "b.yaml").fingerprints("data")
    assert plan.fingerprints("data") == load_plan(write_job(tmp_path / "c.yaml", explicit)).fingerprints("data")


def test_an_upstream_change_changes_every_fingerprint_downstream(tmp_path):
    before = load_plan(write_job(tmp_path / "a.yaml", JOB)).fingerprints("data")
    changed = yaml.safe_load(yaml.safe_dump(JOB))
    changed["stages"][3]["optimizer"] = {"lr": 0.01}  # the teacher's learning rate
    after = load_plan(write_job(tmp_path / "b.yaml", changed)).fingerprints("data")
    assert {n for n in before if before[n] != after[n]} == {"teacher", "assistant", "student"}
    other_data = load_plan(write_job(tmp_path / "c.yaml", JOB)).fingerprints("other data")
    assert all(other_data[n] != before[n] for n in before)
