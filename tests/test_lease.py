"""One driver per run (issue 16, points 2 and 3): a stage run carries a lease, the driver's heartbeat; a second
driver never trains a run a living driver holds, waits for it and reuses it; a lease whose driver is gone is stale
and its run resumable at once. The driver-killed case is `test_resume`'s SIGKILL test, which also checks
`kdpipe status` shows `interrupted`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
from mlflow.entities import Run, RunData, RunInfo, RunTag

from pipeline.tracking import DRIVER, TAG_HEARTBEAT, TAG_HOLDER, Lease, Tracker
from tests.conftest import tiny_job, write_job
from tests.test_resume import KDPIPE, cluster_env, stage_runs


def run_with(status: str, holder: str, heartbeat: float) -> Run:
    info = RunInfo("r", "0", "u", status, 0, None, "active")
    return Run(info, RunData(tags=[RunTag(TAG_HOLDER, holder), RunTag(TAG_HEARTBEAT, str(heartbeat))]))


def test_a_lease_is_live_while_its_driver_beats_and_exists(monkeypatch):
    monkeypatch.setenv("KDPIPE_LEASE_SECONDS", "5")
    now = time.time()
    elsewhere = "other-host:4242:abcd"
    assert Lease.of(run_with("RUNNING", elsewhere, now - 1)).live
    assert not Lease.of(run_with("RUNNING", elsewhere, now - 6)).live  # missed its beats: gone
    assert not Lease.of(run_with("RUNNING", "", now)).live
    assert Lease.of(run_with("RUNNING", DRIVER, now)).live
    # On this host a holder's process is looked up: one that no longer exists holds nothing, however fresh.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{gone.stdout.strip()}:abcd"
    assert not Lease.of(run_with("RUNNING", dead, now)).live
    alive = f"{socket.gethostname()}:{os.getppid()}:abcd"
    assert Lease.of(run_with("RUNNING", alive, now)).live
    assert "pid 4242 on other-host" in Lease.of(run_with("RUNNING", elsewhere, now)).describe()


PAIR = [
    {"name": "teacher", "model": "resnet8", "epochs": 1, "optimizer": {"lr": 0.1}},
    {"name": "student", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 1},
]


def test_two_drivers_started_together_train_each_stage_once(ray_local, tmp_path):
    """Two real `kdpipe run` processes of one job at the same moment: each stage ends with exactly one FINISHED
    run, trained by one driver; the other waited for it and reused it (its table says so)."""
    path = write_job(tmp_path / "job.yaml", tiny_job(tmp_path, PAIR, train_size=256, val_size=64))
    env = cluster_env(ray_local, COLUMNS="200")
    drivers = [
        subprocess.Popen([*KDPIPE, "run", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    started = time.monotonic()
    cpu = {driver.pid: 0.0 for driver in drivers}  # each driver's own CPU seconds, last seen alive
    sampler = threading.Thread(target=sample_cpu, args=(drivers, cpu), daemon=True)
    sampler.start()
    results = [driver.communicate(timeout=600) for driver in drivers]
    wall = time.monotonic() - started
    assert [driver.returncode for driver in drivers] == [0, 0], [err.decode()[-2000:] for _, err in results]
    tables = [out.decode() for out, _ in results]
    for stage in ("teacher", "student"):
        rows = [next(line for line in table.splitlines() if f"│ {stage} " in line) for table in tables]
        states = sorted("done" if " done " in row else "reused" if " reused " in row else row for row in rows)
        assert states == ["done", "reused"], rows
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    for stage in ("teacher", "student"):
        runs = stage_runs(tracker, stage)  # runs a driver created and then gave up are deleted, not listed
        assert [run.info.status for run in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
        assert runs[0].data.tags[TAG_HOLDER].split(":")[1] in {str(d.pid) for d in drivers}
    # A driver waiting for the other polls every few seconds; it does not spin a core the training needs.
    assert all(seconds < wall / 2 for seconds in cpu.values()), (cpu, wall)


def sample_cpu(drivers: list[subprocess.Popen], cpu: dict[int, float]) -> None:
    while any(driver.poll() is None for driver in drivers):
        for driver in drivers:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(driver.pid).cpu_times()
                cpu[driver.pid] = times.user + times.system
        time.sleep(0.5)
