"""Issue 5: interrupted stages go on where they stopped; finished ones are reused; `--force` retrains downstream.

A 3-stage chain on tiny synthetic data. Each test builds on the store the previous ones left, in file order:
kill the driver mid-stage (SIGKILL by pid), resume from the MLflow checkpoint, retrain with `--force` (the
uninterrupted reference the resumed stage must match), read `kdpipe status`, change one hyperparameter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from pipeline.cli import main
from pipeline.models import load_weights
from pipeline.plan import load_plan
from pipeline.runner import run_job
from pipeline.tracking import TAG_RESUMED, Tracker
from tests.conftest import tiny_job, write_job

KDPIPE = [sys.executable, "-m", "pipeline.cli"]
STEPS_PER_EPOCH = 256 // 2 // 32  # train_size / workers / batch_size
STAGES = [
    {"name": "teacher", "model": "resnet8", "epochs": 1, "optimizer": {"lr": 0.05}},
    {
        "name": "assistant",  # the stage that gets killed: ZeRO-2, so optimizer state is partitioned over ranks
        "model": "resnet8",
        "teachers": ["teacher"],
        "method": "kd",
        "epochs": 4,
        "deepspeed": {"zero_stage": 2},
    },
    {"name": "student", "model": "resnet8", "teachers": ["assistant"], "method": "kd", "epochs": 1},
]
CHECKPOINTING = {"every_steps": 2, "every_minutes": 0, "keep": 2}


def cluster_env(ray_local, **extra: str) -> dict[str, str]:
    """A `kdpipe` subprocess joins the test session's Ray cluster as a driver of its own."""
    return dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, **extra)


def stage_runs(tracker: Tracker, stage: str | None = None) -> list:
    """Stage runs (of one stage, if named), newest first."""
    experiment = tracker.client.get_experiment_by_name("tests")
    if experiment is None:
        return []
    which = f"tags.`kdpipe.stage` = '{stage}'" if stage else "tags.`kdpipe.kind` = 'stage'"
    return tracker.client.search_runs([experiment.experiment_id], which, order_by=["attributes.start_time DESC"])


def latest_runs(tracker: Tracker) -> dict[str, str]:
    """The newest run id of each stage."""
    latest: dict[str, str] = {}
    for run in stage_runs(tracker):
        latest.setdefault(run.data.tags["kdpipe.stage"], run.info.run_id)
    return latest


def wait_for_checkpoint(tracker: Tracker, stage: str, process: subprocess.Popen | None = None) -> str:
    """The run id of `stage` once its first checkpoint is complete in MLflow."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for run in stage_runs(tracker, stage):
            if tracker.checkpoints(run.info.run_id):
                return run.info.run_id
        assert process is None or process.poll() is None, "the driver ended before the stage saved a checkpoint"
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint of {stage} within 300 s")


def train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def wait_until_workers_exit(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while train_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not train_workers(), "Ray Train workers outlived their driver"


def final_metric(tracker: Tracker, run_id: str, key: str) -> float:
    return tracker.client.get_metric_history(run_id, key)[-1].value


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    job = tiny_job(root, STAGES, train_size=256, val_size=128)
    job["checkpoint"] = CHECKPOINTING
    path = write_job(root / "job.yaml", job)
    return root, path, Tracker(job["tracking"]["uri"])


def test_driver_killed_mid_stage_resumes_from_its_mlflow_checkpoint(ray_local, chain):
    """Point 2: SIGKILL the driver during stage 2; the rerun reuses stage 1, continues stage 2 from its last
    checkpoint artifact in the same MLflow run (the step count goes on from there) and runs stage 3."""
    root, job, tracker = chain
    driver = subprocess.Popen([*KDPIPE, "run", str(job)], env=cluster_env(ray_local), stderr=subprocess.DEVNULL)
    assistant = wait_for_checkpoint(tracker, "assistant", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_until_workers_exit()
    teacher = stage_runs(tracker, "teacher")[0].info.run_id
    stored = tracker.checkpoints(assistant)
    resumed_step = int(stored[-1].split("-")[-1])
    total = STAGES[1]["epochs"] * STEPS_PER_EPOCH
    assert 0 < resumed_step < total and len(stored) <= CHECKPOINTING["keep"]
    assert tracker.client.get_run(assistant).info.status == "RUNNING"  # nobody lived to close it
    # Remove Ray Train's own storage, as on a new machine: only MLflow's artifact is left to resume from.
    shutil.rmtree(root / "out" / "ray")

    outcomes = run_job(load_plan(job))

    statuses = {n: o.status for n, o in outcomes.items()}
    assert statuses == {"teacher": "reused", "assistant": "done", "student": "done"}, outcomes["assistant"].error
    assert outcomes["teacher"].run_id == teacher
    assert outcomes["assistant"].run_id == assistant and outcomes["assistant"].resumed
    run = tracker.client.get_run(assistant)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_RESUMED] == f"{stored[-1]} (MLflow artifact)"
    steps = tracker.client.get_metric_history(assistant, "global_step")
    # The step count goes on: epoch e ends at step (e + 1) * steps-per-epoch, before and after the kill alike.
    assert {(m.step, int(m.value)) for m in steps} == {(e, (e + 1) * STEPS_PER_EPOCH) for e in range(4)}
    assert len(stage_runs(tracker, "assistant")) == 1  # resumed in place: no second run


def test_force_retrains_downstream_only_and_matches_the_resumed_run(ray_local, chain):
    """`--force assistant` retrains it and the student in new runs, keeps the teacher, deletes nothing; being an
    uninterrupted run of the same config and seed, it is the reference the resumed run must match."""
    _, job, tracker = chain
    before = latest_runs(tracker)
    outcomes = run_job(load_plan(job), force=("assistant",))
    assert {n: o.status for n, o in outcomes.items()} == {"teacher": "reused", "assistant": "done", "student": "done"}
    assert outcomes["teacher"].run_id == before["teacher"]
    for stage in ("assistant", "student"):
        old, new = before[stage], outcomes[stage].run_id
        assert new != old
        assert tracker.client.get_run(old).info.status == "FINISHED"
        assert {a.path for a in tracker.client.list_artifacts(old, "weights")} == {
            "weights/model.safetensors",
            "weights/model.json",
        }
    resumed, uninterrupted = before["assistant"], outcomes["assistant"].run_id
    # Stated tolerance: top-1 within 0.01 and training loss within 1e-4 relative (CPU, fp32, fixed seed: the
    # resumed run replays the same batches with the same optimizer state, so it matches to rounding).
    assert abs(final_metric(tracker, resumed, "val/top1") - final_metric(tracker, uninterrupted, "val/top1")) <= 0.01
    loss = [final_metric(tracker, run, "train/loss") for run in (resumed, uninterrupted)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-4)
    weights = [load_weights(tracker.download_weights(run)).state_dict() for run in (resumed, uninterrupted)]
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=1e-4, atol=1e-5)


def test_status_shows_each_stage(chain, capsys):
    _, job, tracker = chain
    assert main(["status", str(job)]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    latest = latest_runs(tracker)
    assert "reused" in lines["teacher"] and latest["teacher"] in lines["teacher"]
    assert "done" in lines["assistant"] and "4/4" in lines["assistant"]
    assert f" {4 * STEPS_PER_EPOCH} " in lines["assistant"] and latest["assistant"] in lines["assistant"]
    job_run = tracker.latest_job_run(tracker.experiment_id("tests"), "tiny").info.run_id
    assert main(["status", job_run, "--tracking-uri", tracker.uri]) == 0  # the same table, found by run id
    assert latest["student"] in capsys.readouterr().out
    assert main(["status", "no-such-run", "--tracking-uri", tracker.uri]) == 2


def test_changing_stage_2_retrains_stages_2_and_3(ray_local, chain):
    """Point 5: one hyperparameter of stage 2 changes its fingerprint and its student's, not its teacher's."""
    root, job, tracker = chain
    changed = load_plan(job).job.model_dump()
    changed["stages"][1]["optimizer"]["lr"] = 0.02
    before = latest_runs(tracker)
    outcomes = run_job(load_plan(write_job(root / "changed.yaml", changed)))
    assert outcomes["teacher"].status == "reused" and outcomes["teacher"].run_id == before["teacher"]
    for stage in ("assistant", "student"):
        assert outcomes[stage].status == "done" and outcomes[stage].run_id != before[stage]


def test_a_killed_worker_restarts_from_the_last_checkpoint_in_the_same_run(ray_local, tmp_path):
    """Point 3: SIGKILL one Ray Train worker mid-stage; Ray Train restarts the worker group, which continues
    from the latest checkpoint (`ray.train.get_checkpoint()`), and the stage finishes in its one MLflow run."""
    job = tiny_job(tmp_path, [{"name": "solo", "model": "resnet8", "epochs": 4}], train_size=256, val_size=128)
    job["checkpoint"] = CHECKPOINTING
    plan = load_plan(write_job(tmp_path / "job.yaml", job))
    tracker = Tracker(job["tracking"]["uri"])
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_job(plan)))
    thread.start()
    run_id = wait_for_checkpoint(tracker, "solo")
    victim = train_workers()[-1]
    victim.send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert result["solo"].status == "done", result["solo"].error
    assert [run.info.run_id for run in stage_runs(tracker, "solo")] == [run_id]
    tags = tracker.client.get_run(run_id).data.tags
    assert tags[TAG_RESUMED].endswith("(Ray Train checkpoint)")
    assert final_metric(tracker, run_id, "global_step") == 4 * STEPS_PER_EPOCH


def test_kdpipe_run_force_names_a_stage_of_the_job(chain, capsys):
    _, job, _ = chain
    assert main(["run", str(job), "--force", "nope"]) == 2
    assert "--force: no stage 'nope'" in capsys.readouterr().err
