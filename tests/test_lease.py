"""One driver per run (issue 16, points 2 and 3): a stage run carries a lease, the driver's heartbeat; a second
driver never trains a run a living driver holds, waits for it and reuses it; a lease whose driver is gone is stale
and its run resumable at once. The driver-killed case is `test_resume`'s SIGKILL test, which also checks
`kdpipe status` shows `interrupted`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from mlflow.entities import Run, RunData, RunInfo, RunTag

from kdpipe.tracking.lease import DRIVER, Lease
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_HEARTBEAT, TAG_HOLDER
from tests.conftest import REPEATS
from tests.test_resume import stage_runs


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


def test_two_drivers_started_together_train_each_stage_once(two_drivers_over_seeds):
    """Two real `kdpipe run` processes of one job (four stages: a teacher and a student over two seeds) at the
    same moment: each stage ends with exactly one FINISHED run, trained by one driver; the other waited for it
    and reused it (its table says so)."""
    drivers = two_drivers_over_seeds
    assert drivers.returncodes == [0, 0], [err[-2000:] for _, err in drivers.outputs]
    tracker = Tracker(drivers.tracking_uri)
    for stage in REPEATS:
        rows = [next(line for line in out.splitlines() if f"│ {stage} " in line) for out, _ in drivers.outputs]
        states = sorted("done" if " done " in row else "reused" if " reused " in row else row for row in rows)
        assert states == ["done", "reused"], rows
        runs = stage_runs(tracker, stage)  # runs a driver created and then gave up are deleted, not listed
        assert [run.info.status for run in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
        assert runs[0].data.tags[TAG_HOLDER].split(":")[1] in {str(pid) for pid in drivers.pids}
    # A driver waiting for the other polls every few seconds; it does not spin a core the training needs.
    assert all(seconds < drivers.wall / 2 for seconds in drivers.cpu.values()), (drivers.cpu, drivers.wall)
