"""Leases: which driver trains a stage run, so two `kdpipe run`s of one job never train a stage twice.

A run carries its holder (host, pid and a random part of the driver) and a heartbeat, renewed by that driver a few
times per lease. A lease older than KDPIPE_LEASE_SECONDS is stale, and so, at once, is one whose driver ran on this
machine and is gone: the next driver takes the run over and resumes it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

from mlflow.entities import Run

from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_FINGERPRINT, TAG_HEARTBEAT, TAG_HOLDER

DEFAULT_LEASE_SECONDS = 180.0
LEASE_SETTLE_SECONDS = 1.0  # a driver taking over a stale run reads the lease back after this long: last writer wins
# This process, as a lease names it: host, pid and a random part (pids are reused).
DRIVER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_seconds() -> float:
    return float(os.environ.get("KDPIPE_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


@dataclass(frozen=True)
class Lease:
    """Who trains a run: the driver and its last heartbeat."""

    holder: str
    heartbeat: float

    @classmethod
    def of(cls, run: Run) -> Lease:
        tags = run.data.tags
        try:
            heartbeat = float(tags.get(TAG_HEARTBEAT, "0"))
        except ValueError:
            heartbeat = 0.0
        return cls(tags.get(TAG_HOLDER, ""), heartbeat)

    @property
    def live(self) -> bool:
        """Renewed within the lease time, by a driver that (if it ran on this host) still exists."""
        if not self.holder or time.time() - self.heartbeat > lease_seconds():
            return False
        host, pid, _ = (self.holder.split(":") + ["", "", ""])[:3]
        if host == socket.gethostname() and pid.isdigit() and pid != str(os.getpid()):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return True

    def describe(self) -> str:
        host, pid, _ = (self.holder.split(":") + ["", "", ""])[:3]
        since = time.strftime("%H:%M:%S", time.localtime(self.heartbeat))
        return f"by the kdpipe driver pid {pid} on {host} (heartbeat {since})"


def run_is_live(run: Run) -> bool:
    """An unfinished run that a living driver holds."""
    return run.info.status == "RUNNING" and Lease.of(run).live


def held() -> dict[str, str]:
    """The tags of a lease this driver holds from now on."""
    return {TAG_HOLDER: DRIVER, TAG_HEARTBEAT: str(time.time())}


def first_live_run(tracker: Tracker, experiment_id: str, fingerprint: str) -> Run | None:
    """Of the runs of this fingerprint that living drivers hold, the first created: drivers that created runs
    of one stage at the same moment all agree that this one trains it."""
    running = f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and attributes.status = 'RUNNING'"
    runs = [run for run in tracker.search_runs(experiment_id, running) if run_is_live(run)]
    return min(runs, key=lambda run: (run.info.start_time, run.info.run_id), default=None)


def take_over(tracker: Tracker, run_id: str) -> bool:
    """Hold a run whose driver is gone; False if another driver took it at the same moment (the lease is
    written, left to settle, and read back: the last writer holds it)."""
    renew(tracker, [run_id])
    time.sleep(LEASE_SETTLE_SECONDS)
    return Lease.of(tracker.get_run(run_id)).holder == DRIVER


def renew(tracker: Tracker, run_ids: list[str]) -> None:
    """The heartbeat of runs this driver trains."""
    for run_id in run_ids:
        tracker.set_tags(run_id, held())


def release(tracker: Tracker, run_id: str) -> None:
    """Give up a run this driver was training (it stops): the next driver may resume it at once."""
    tracker.set_tags(run_id, {TAG_HEARTBEAT: "0"})
