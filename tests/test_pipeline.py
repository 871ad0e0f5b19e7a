"""A real 3-stage DAG end to end: local Ray, 2 DeepSpeed workers per stage over gloo, sqlite MLflow, tar shards."""

from __future__ import annotations

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import build_model, load_weights
from pipeline.plan import load_plan
from pipeline.runner import run_job
from pipeline.tracking import Tracker
from tests.conftest import tiny_job, write_job

STAGES = [
    {"name": "teacher", "model": "resnet8", "epochs": 3, "optimizer": {"lr": 0.05}},
    {"name": "assistant", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 2},
    {
        "name": "student",
        "model": "resnet8",
        "teachers": ["assistant"],
        "method": "kd",
        "epochs": 2,
        "deepspeed": {"zero_stage": 2},
    },
]


@pytest.fixture(scope="module")
def finished_job(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("dag")
    plan = load_plan(write_job(root / "job.yaml", tiny_job(root, STAGES, train_size=1024)))
    outcomes = run_job(plan)
    return root, plan, outcomes


def test_every_stage_trains_and_learns(finished_job):
    _, _, outcomes = finished_job
    assert [o.status for o in outcomes.values()] == ["done"] * 3, [o.error for o in outcomes.values()]
    assert outcomes["teacher"].metrics["val/top1"] > 0.2  # 10 classes: twice chance


def test_mlflow_records_parent_and_nested_stage_runs(finished_job):
    root, plan, outcomes = finished_job
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tests"])  # one row per run
    parents = runs[runs["tags.kdpipe.kind"] == "job"]
    stages = runs[runs["tags.kdpipe.kind"] == "stage"]
    assert len(parents) == 1 and len(stages) == 3
    assert set(stages["tags.mlflow.parentRunId"]) == {parents["run_id"].iloc[0]}
    client = Tracker(uri).client
    for name, outcome in outcomes.items():
        row = stages[stages["tags.kdpipe.stage"] == name].iloc[0]
        assert row["run_id"] == outcome.run_id and row["status"] == "FINISHED"
        assert row["tags.kdpipe.fingerprint"] == outcome.fingerprint and len(outcome.fingerprint) == 64
        assert row["params.model"] == "resnet8" and row["params.method"] == plan.stages[name].spec.method
        epochs = plan.stages[name].spec.epochs
        assert [m.step for m in client.get_metric_history(outcome.run_id, "val/top1")] == list(range(epochs))
        assert len(client.get_metric_history(outcome.run_id, "train/loss")) == epochs
        files = {a.path for a in client.list_artifacts(outcome.run_id, "weights")}
        assert files == {"weights/model.safetensors", "weights/model.json"}
    assert stages[stages["tags.kdpipe.stage"] == "student"].iloc[0]["params.params.temperature"] == "4.0"


def test_student_loaded_its_teachers_trained_weights(finished_job):
    """The teacher logits the student stage computed match the assistant stage's saved model on a fixed batch."""
    root, _, outcomes = finished_job
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    student_run = tracker.client.get_run(outcomes["student"].run_id)
    assert student_run.data.tags["kdpipe.teacher.assistant"] == outcomes["assistant"].run_id
    probe = load_file(
        tracker.client.download_artifacts(student_run.info.run_id, "teachers/probe.safetensors", str(root))
    )
    saved = load_weights(tracker.download_weights(outcomes["assistant"].run_id)).eval()
    with torch.no_grad():
        expected = saved(probe["images"])
        untrained = build_model("resnet8", 10).eval()(probe["images"])
    torch.testing.assert_close(probe["assistant"], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(probe["assistant"], untrained, atol=1e-2)
