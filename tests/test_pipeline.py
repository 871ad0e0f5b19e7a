"""A real 3-stage DAG end to end: local Ray, 2 DeepSpeed workers per stage over gloo, sqlite MLflow, tar shards."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import mlflow
import torch
from safetensors.torch import load_file

from kdpipe.driver.runner import run_job
from kdpipe.models import build_model, load_weights
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_SETTINGS
from kdpipe.worker import artifacts
from tests.conftest import CHAIN_STEPS_PER_EPOCH, teacher_batches, tiny_job, write_job


def test_every_stage_trains_and_learns(finished_chain):
    _, _, outcomes = finished_chain
    assert [o.status for o in outcomes.values()] == ["done"] * 3, [o.error for o in outcomes.values()]
    assert outcomes["teacher"].metrics["val/top1"] > 0.2  # 10 classes: twice chance


def test_mlflow_records_parent_and_nested_stage_runs(finished_chain):
    root, plan, outcomes = finished_chain
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tests"])  # one row per run
    parents = runs[runs["tags.kdpipe.kind"] == "job"]
    stages = runs[runs["tags.kdpipe.kind"] == "stage"]
    # Every stage run is nested under one job run (a later rerun that reuses them adds a job run, no stage run).
    assert len(stages) == 3 and stages["tags.mlflow.parentRunId"].nunique() == 1
    assert stages["tags.mlflow.parentRunId"].iloc[0] in set(parents["run_id"])
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


def test_the_first_students_of_a_teacher_fill_its_cache(finished_chain):
    """Issue 15: the assistant and the student (both KD) each ran their teacher on every step of both ranks, and
    left one cache file per epoch and rank under the workdir; the teacher (labels) has no cache."""
    root, plan, outcomes = finished_chain
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    for name in ("assistant", "student"):
        epochs = plan.stages[name].spec.epochs
        assert teacher_batches(tracker, outcomes[name].run_id) == [(2 * CHAIN_STEPS_PER_EPOCH, 0)] * epochs
    assert "teacher_cache/computed" not in outcomes["teacher"].metrics
    files = sorted(p.name for p in (root / "out" / "teacher-cache").glob("*/*"))
    expected = [f"epoch-{e:05d}-rank-{r:04d}.safetensors" for e in range(3) for r in range(2)]
    assert files == sorted(expected + expected[:4])  # the assistant's 3 epochs and the student's 2


def test_a_stages_ray_train_run_starts_no_ray_data_actor(finished_chain):
    """Issue 14: a stage's Ray Train run starts its workers and no `DatasetManager` (Ray Train starts one per run,
    a process importing Ray Data, that kdpipe's runs never use; `kdpipe.driver.trainer`)."""
    from ray.util.state import list_actors

    def started(cls: str) -> int:
        return len(list_actors(filters=[("class_name", "=", cls)], limit=10_000, raise_on_missing_output=False))

    assert started("RayTrainWorker") >= 2 * 3  # the chain's three stages, two workers each
    assert started("TrainController") >= 3
    assert started("DatasetManager") == 0


def test_student_loaded_its_teachers_trained_weights(finished_chain):
    """The teacher logits the student stage computed match the assistant stage's saved model on a fixed batch."""
    root, _, outcomes = finished_chain
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    student_run = tracker.client.get_run(outcomes["student"].run_id)
    assert student_run.data.tags["kdpipe.teacher.assistant"] == outcomes["assistant"].run_id
    probe = load_file(
        tracker.client.download_artifacts(student_run.info.run_id, "teachers/probe.safetensors", str(root))
    )
    with tracker.artifacts(outcomes["assistant"].run_id).downloaded(artifacts.WEIGHTS) as folder:
        saved = load_weights(folder).eval()
    with torch.no_grad():
        expected = saved(probe["images"])
        untrained = build_model("resnet8", 10).eval()(probe["images"])
    torch.testing.assert_close(probe["assistant"], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(probe["assistant"], untrained, atol=1e-2)


def test_a_second_run_reuses_every_stage(finished_chain):
    """Issue 5, point 1: nothing is trained again, the same MLflow runs are reused, in a fraction of the time."""
    root, plan, first = finished_chain
    started = time.perf_counter()
    second = run_job(plan)
    seconds = time.perf_counter() - started
    first_seconds = sum(o.seconds for o in first.values())
    print(f"\nfirst run: {first_seconds:.1f}s of stage time; second run: {seconds:.1f}s in all")
    assert [o.status for o in second.values()] == ["reused"] * 3
    assert {n: o.run_id for n, o in second.items()} == {n: o.run_id for n, o in first.items()}
    assert second["teacher"].metrics["val/top1"] == first["teacher"].metrics["val/top1"]
    assert seconds < 0.25 * first_seconds


RERUN = """
import sys
from kdpipe.cli import main
code = main(["run", sys.argv[1]])
print(code, *sorted(m for m in ("ray", "deepspeed", "torchvision") if m in sys.modules))
"""


def test_a_rerun_of_a_finished_job_imports_no_ray_and_no_training_stack(finished_chain):
    """Issue 14, point 3: a rerun that reuses every stage starts no Ray; nor does it import DeepSpeed or
    torchvision (seconds each: the shard decoder imports torchvision where it decodes)."""
    root, _, _ = finished_chain
    rerun = subprocess.run([sys.executable, "-c", RERUN, str(root / "job.yaml")], capture_output=True, text=True)
    assert rerun.stdout.strip().splitlines()[-1] == "0", rerun.stdout[-2000:] + rerun.stderr[-2000:]


def test_a_failed_stage_skips_its_students_and_exits_1(ray_local, tmp_path, capsys):
    """A stage that cannot run (each of its 2 workers would get 32 of 64 images, less than a batch) fails before
    any worker starts, with its reason in one line; its student is skipped; the job run is FAILED; exit 1."""
    from kdpipe.cli import main

    stages = [
        {"name": "teacher", "model": "resnet8", "epochs": 1},
        {"name": "student", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 1},
    ]
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages, train_size=64, batch_size=64))
    assert main(["run", str(job)]) == 1
    captured = capsys.readouterr()
    assert "teacher: " in captured.err and "no full batch of 64 per worker" in captured.err
    assert "student: a teacher stage did not finish" in captured.err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tests"])
    assert list(runs["status"]) == ["FAILED"] and list(runs["tags.kdpipe.kind"]) == ["job"]  # no stage ran


def latest_stage_runs(tracker: Tracker) -> dict[str, str]:
    latest: dict[str, str] = {}
    for run in tracker.client.search_runs(
        [tracker.experiment_id("tests")], "tags.`kdpipe.kind` = 'stage'", order_by=["attributes.start_time DESC"]
    ):
        latest.setdefault(run.data.tags["kdpipe.stage"], run.info.run_id)
    return latest


def test_force_retrains_the_stage_and_downstream_in_new_runs(finished_chain):
    """`--force student` retrains only the student, in a new run; the old run and its weights stay."""
    root, plan, first = finished_chain
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    outcomes = run_job(plan, force=("student",))
    assert {n: o.status for n, o in outcomes.items()} == {"teacher": "reused", "assistant": "reused", "student": "done"}
    assert outcomes["assistant"].run_id == first["assistant"].run_id
    old = first["student"].run_id
    assert outcomes["student"].run_id != old and tracker.client.get_run(old).info.status == "FINISHED"
    assert {a.path for a in tracker.client.list_artifacts(old, "weights")} == {
        "weights/model.safetensors",
        "weights/model.json",
    }
    # Issue 15, point 3: the rerun read every teacher batch from the cache the first run left; the teacher never ran.
    epochs = plan.stages["student"].spec.epochs
    assert teacher_batches(tracker, outcomes["student"].run_id) == [(0, 2 * CHAIN_STEPS_PER_EPOCH)] * epochs


def test_status_table_shows_each_stage(finished_chain, capsys):
    """`kdpipe status`, by job file and by job run id: state, epochs, checkpoint step and run id per stage."""
    from kdpipe.cli import main

    root, plan, first = finished_chain
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    job_file = root / "job.yaml"
    assert main(["status", str(job_file)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    latest = latest_stage_runs(tracker)
    assert set(rows) == {"teacher", "assistant", "student"}
    for stage, state in {"teacher": "reused", "assistant": "reused", "student": "done"}.items():
        assert f" {state} " in rows[stage] and latest[stage] in rows[stage], rows[stage]
    epochs = plan.stages["assistant"].spec.epochs
    assert f" {epochs}/{epochs} " in rows["assistant"]
    assert f" {epochs * CHAIN_STEPS_PER_EPOCH} " in rows["assistant"]  # the global step of its last checkpoint
    job_run = tracker.latest_job_run(tracker.experiment_id("tests"), "tiny").info.run_id
    assert main(["status", job_run, "--tracking-uri", tracker.uri]) == 0
    assert latest["student"] in capsys.readouterr().out
    assert main(["status", "no-such-run", "--tracking-uri", tracker.uri]) == 2
    assert main(["run", str(job_file), "--force", "nope"]) == 2
    assert "--force: no stage 'nope'" in capsys.readouterr().err


def test_a_setting_changes_its_stage_for_status_and_the_job_run_records_it(finished_chain, capsys):
    """Issue 17, point 2: `--set` changes a field as an edited job file would. The student's learning rate set
    to another value: `kdpipe status` shows the student outdated and its teachers not. Settings equal to the
    file's values change nothing (every stage reused, no training), and the job run records them."""
    from kdpipe.cli import main

    root, _, first = finished_chain
    job_file = root / "job.yaml"
    assert main(["status", str(job_file), "--set", "stages.student.optimizer.lr=0.0123"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert " outdated " in rows["student"] and " outdated " not in rows["teacher"] + rows["assistant"], rows
    same = ["--set", "stages.student.epochs=2", "--set", "data.val_size=128"]
    assert main(["run", str(job_file), *same]) == 0
    assert capsys.readouterr().out.count(" reused ") == 3
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    job_run = tracker.latest_job_run(tracker.experiment_id("tests"), "tiny")
    assert json.loads(job_run.data.tags[TAG_SETTINGS]) == ["stages.student.epochs=2", "data.val_size=128"]
