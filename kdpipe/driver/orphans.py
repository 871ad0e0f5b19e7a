"""Placement groups a dead Ray Train controller left behind, found and removed while the job runs.

Ray Train 2.60 makes each run's placement group from the run's controller actor, unnamed
(`ray.train.v2._internal.execution.worker_group.worker_group.WorkerGroup._create_placement_group`). A placement
group an actor made lives until both that actor and its job are dead, and Ray Train's own cleaner learns of the
group only once the worker group has started (`PlacementGroupCleanerCallback.after_worker_group_start`). So a
controller that dies while its group is pending or its workers start (a trial Tune stops, a start that timed out
under load, a controller killed) leaves a group that holds its CPUs as long as the driver lives, and every later
stage or trial waits for them (ray-project/ray#54305).

Ray's placement group table records, for every group, the actor that made it and whether that actor is dead; the
State API lists the job that made it but not the actor, so the table is read through Ray's GCS accessor. In a
kdpipe driver's job, the groups an actor made are Ray Train controllers' (Tune's trial groups and everything else
are the driver's own), so one whose maker is dead has no user left: the sweeper removes it within a few seconds.
A driver killed outright takes its job with it, and Ray removes what its dead controllers made.
"""

from __future__ import annotations

import contextlib
import threading

SWEEP_SECONDS = 2.0  # how long an orphaned group can hold its resources


def group_records() -> list:
    """Ray's record of every placement group (`PlacementGroupTableData`), with the actor that made it."""
    import ray._private.state
    from ray.core.generated import gcs_pb2

    accessor = ray._private.state.state._connect_and_get_accessor()
    return [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]


def orphaned_groups(job_id: str) -> list[bytes]:
    """The ids of the live placement groups job `job_id`'s actors made and outlived."""
    import ray

    return [
        group.placement_group_id
        for group in group_records()
        if group.creator_job_id.hex() == job_id
        and group.creator_actor_dead
        and not ray.ActorID(group.creator_actor_id).is_nil()  # made by an actor, not by the driver
        and not group.is_detached
        and group.state != group.REMOVED
    ]


def remove_orphans() -> None:
    """Remove this driver's job's orphaned placement groups."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for group in orphaned_groups(ray.get_runtime_context().get_job_id()):
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(group)))


class OrphanSweeper:
    """A driver thread that removes the job's orphaned placement groups every few seconds."""

    def __init__(self, every: float = SWEEP_SECONDS):
        self.every = every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sweep, name="kdpipe-orphan-sweeper", daemon=True)
        self.thread.start()

    def sweep(self) -> None:
        while not self.stopped.wait(self.every):
            # A sweep that fails (the GCS busy or restarting) is the next one's to do.
            with contextlib.suppress(Exception):
                remove_orphans()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.every + 5)
