"""Issue 5: interrupted stages go on where they stopped, in the same MLflow run.

Real faults: the driver killed by pid mid-stage, a Ray Train worker killed by pid, a real `mlflow server` stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests
import torch

from kdpipe.cli import main
from kdpipe.driver.launch import ray_run_name, storage_path
from kdpipe.driver.runner import run_job
from kdpipe.models import load_weights
from kdpipe.plan import load_plan
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_RESUMED
from kdpipe.worker import artifacts
from tests.conftest import (
    CHAIN,
    CHAIN_DATA,
    CHAIN_STEPS_PER_EPOCH,
    KDPIPE,
    cluster_env,
    teacher_batches,
    tiny_job,
    write_job,
)

CHECKPOINTING = {"every_steps": 2, "every_minutes": 0, "keep": 2}


def stage_runs(tracker: Tracker, stage: str | None = None) -> list:
    """Stage runs (of one stage, if named), newest first."""
    experiment = tracker.client.get_experiment_by_name("tests")
    if experiment is None:
        return []
    which = f"tags.`kdpipe.stage` = '{stage}'" if stage else "tags.`kdpipe.kind` = 'stage'"
    return tracker.client.search_runs([experiment.experiment_id], which, order_by=["attributes.start_time DESC"])


def wait_for_checkpoint(
    tracker: Tracker, stage: str, process: subprocess.Popen | None = None, known: set[str] = frozenset()
) -> str:
    """The run id of a new run of `stage` once its first checkpoint is complete in MLflow."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for run in stage_runs(tracker, stage):
            if run.info.run_id not in known and artifacts.stored_checkpoints(tracker.artifacts(run.info.run_id)):
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


def test_driver_killed_mid_stage_resumes_from_its_mlflow_checkpoint(ray_local, finished_chain, capsys):
    """Points 2 and 5: change one hyperparameter of the last stage of the finished chain (ZeRO-2, 2 epochs) and
    run it; SIGKILL the driver during that stage. The rerun reuses the teacher and the assistant and continues the
    student from its last checkpoint artifact in the same MLflow run (the step count goes on from there), beside
    the old student run. Issue 16, point 3: the killed driver's lease (a 5 s one here) is stale, `kdpipe status`
    says `interrupted`, and the rerun takes the run over at once."""
    root, plan, first = finished_chain
    changed = plan.job.model_dump()
    changed["stages"][2]["optimizer"]["lr"] = 0.02
    changed["checkpoint"] = CHECKPOINTING
    path = write_job(root / "changed.yaml", changed)
    tracker = Tracker(plan.job.tracking.uri)
    known = {run.info.run_id for run in stage_runs(tracker, "student")}
    env = cluster_env(ray_local, KDPIPE_LEASE_SECONDS="5")
    driver = subprocess.Popen([*KDPIPE, "run", str(path)], env=env, stderr=subprocess.DEVNULL)
    student = wait_for_checkpoint(tracker, "student", driver, known)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_until_workers_exit()
    stored = artifacts.stored_checkpoints(tracker.artifacts(student))
    epochs = CHAIN[2]["epochs"]
    assert 0 < int(stored[-1].split("-")[-1]) < epochs * CHAIN_STEPS_PER_EPOCH
    assert len(stored) <= CHECKPOINTING["keep"]
    assert tracker.client.get_run(student).info.status == "RUNNING"  # nobody lived to close it
    capsys.readouterr()
    assert main(["status", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "│ student " in line)
    assert " interrupted " in row and student in row, row
    # Remove Ray Train's storage of the run, as on a new machine: only MLflow's artifact is left to resume from.
    shutil.rmtree(Path(storage_path(plan.job.workdir)) / ray_run_name("tiny", "student", student))

    outcomes = run_job(load_plan(path))

    statuses = {n: o.status for n, o in outcomes.items()}
    assert statuses == {"teacher": "reused", "assistant": "reused", "student": "done"}, outcomes["student"].error
    assert {n: outcomes[n].run_id for n in ("teacher", "assistant")} == {
        n: first[n].run_id for n in ("teacher", "assistant")
    }
    assert outcomes["student"].run_id == student and outcomes["student"].resumed
    assert {run.info.run_id for run in stage_runs(tracker, "student")} == known | {student}  # no extra run
    run = tracker.client.get_run(student)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_RESUMED] == f"{stored[-1]} (MLflow artifact)"
    steps = tracker.client.get_metric_history(student, "global_step")
    # The step count goes on: epoch e ends at step (e + 1) * steps-per-epoch, before and after the kill alike.
    assert {(m.step, int(m.value)) for m in steps} == {(e, (e + 1) * CHAIN_STEPS_PER_EPOCH) for e in range(epochs)}
    # Issue 15, point 3: a second student of the assistant (another learning rate), killed and resumed, read its
    # teacher batches from the cache the chain's student left (the epoch cut short: from where it resumed): the
    # assistant never ran.
    batches = teacher_batches(tracker, student)
    assert batches and all(computed == 0 and read > 0 for computed, read in batches), batches


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on loopback: sqlite backend, artifacts proxied to a local folder."""
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",  # one web process and no job runners: the 2 cores are for the training under test
            "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopping it stops its web workers too
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return server
        assert server.poll() is None, "mlflow server exited"
        time.sleep(0.5)
    raise AssertionError("mlflow server did not answer /health within 120 s")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def test_a_stage_survives_a_killed_worker_and_an_mlflow_outage_and_ends_as_if_uninterrupted(
    ray_local, finished_chain, tmp_path
):
    """Points 3, 4 and 6 on one run of one ZeRO-2 stage, the finished chain's teacher trained again from scratch
    (its own workdir, logging to a real `mlflow server`):
    - SIGKILL a Ray Train worker after the first checkpoint: Ray Train restarts the worker group, which goes on
      from the latest checkpoint (`ray.train.get_checkpoint()`) in the same MLflow run;
    - then stop the server: the stage fails with one line naming the tracking URI, and Ray Train's local
      checkpoint stays;
    - start the server again and rerun: the run resumes from that checkpoint (at a later epoch than the restart)
      and finishes where the chain's uninterrupted run of the same stage ended."""
    root, plan, chain = finished_chain
    uninterrupted = chain["teacher"]
    reference_tracker = Tracker(plan.job.tracking.uri)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    job = tiny_job(tmp_path, CHAIN[:1], **CHAIN_DATA)
    job["data"]["path"] = str(root / "data")  # the chain's synthetic set, already written
    job["tracking"]["uri"] = uri
    job["checkpoint"] = {**CHECKPOINTING, "max_restarts": 1}  # the worker's death takes it; the outage fails
    path = write_job(tmp_path / "job.yaml", job)
    server = start_mlflow_server(tmp_path, port)
    # The driver hands its MLFLOW_* settings to the workers: fail fast instead of retrying for minutes.
    env = cluster_env(ray_local, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    driver = subprocess.Popen([*KDPIPE, "run", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tracker = Tracker(uri)
    run_id = wait_for_checkpoint(tracker, "teacher", driver)
    latest = artifacts.stored_checkpoints(tracker.artifacts(run_id))[-1]
    train_workers()[0].send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 120
    while TAG_RESUMED not in (tags := tracker.client.get_run(run_id).data.tags):  # the restarted group's rank 0
        assert time.monotonic() < deadline and driver.poll() is None, "the worker group did not restart"
        time.sleep(0.3)
    # The restarted group took Ray Train's checkpoint (`get_checkpoint()`): a checkpoint reaches MLflow only after
    # Ray Train's controller took every rank's report of it.
    checkpoint, source = tags[TAG_RESUMED].split(" ", 1)
    assert checkpoint >= latest and source == "(Ray Train checkpoint)", tags[TAG_RESUMED]
    stored = artifacts.stored_checkpoints(tracker.artifacts(run_id))
    stop(server)

    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 1
    errors = err.decode().strip().splitlines()
    assert errors[-1].startswith("teacher: ") and f"MLflow tracking at {uri} failed" in errors[-1], errors[-5:]
    assert "Traceback" not in err.decode()
    print(f"\nthe driver's last line: {errors[-1]}")
    ray_storage = Path(storage_path(job["workdir"]))
    assert sorted(ray_storage.glob("*/checkpoint_*/position.json")), "Ray Train's checkpoint stays"

    server = start_mlflow_server(tmp_path, port)
    try:
        outcome = run_job(load_plan(path))["teacher"]
        assert outcome.status == "done" and outcome.run_id == run_id, outcome.error
        run = tracker.client.get_run(run_id)
        assert [r.info.run_id for r in stage_runs(tracker, "teacher")] == [run_id]  # one run through it all
        assert run.info.status == "FINISHED"
        # Resumed from Ray Train's local checkpoint: at least as new as the last one MLflow got before the outage.
        resumed = run.data.tags[TAG_RESUMED]
        assert resumed.endswith("(Ray Train checkpoint)") and resumed.split()[0] >= stored[-1]
        assert final_metric(tracker, run_id, "global_step") == CHAIN[0]["epochs"] * CHAIN_STEPS_PER_EPOCH
        # Stated tolerance: top-1 within 0.01, loss within 1e-4 relative, weights within 1e-4 (CPU, fp32, fixed
        # seed: each restart replays the same batches, augmented alike, from the same model and ZeRO-2 optimizer
        # state; we see equality).
        for key, tolerance in (("val/top1", 0.01), ("train/loss", 1e-4 * uninterrupted.metrics["train/loss"])):
            restarted = final_metric(tracker, run_id, key)
            assert abs(restarted - final_metric(reference_tracker, uninterrupted.run_id, key)) <= tolerance, key
        with tracker.artifacts(run_id).downloaded(artifacts.WEIGHTS) as folder:
            restarted_weights = load_weights(folder).state_dict()
    finally:
        stop(server)
    with reference_tracker.artifacts(uninterrupted.run_id).downloaded(artifacts.WEIGHTS) as folder:
        reference_weights = load_weights(folder).state_dict()
    for name, value in restarted_weights.items():
        torch.testing.assert_close(value, reference_weights[name], rtol=1e-4, atol=1e-4)
