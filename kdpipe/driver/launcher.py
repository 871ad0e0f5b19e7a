"""How `kdpipe run` launches stages: on Ray, with the job's progress board and tracking actor beside them. Ray is
imported at the first launch: a rerun that reuses every stage never imports it."""

from __future__ import annotations

import os
from typing import Any

from kdpipe.driver.capacity import check_fits, cluster_nodes
from kdpipe.driver.launch import ensure_ray, launch_stage, ray_run_name, storage_holds, storage_path
from kdpipe.job.spec import JobSpec
from kdpipe.plan import PlannedStage
from kdpipe.worker.task import StageTask


class RayLauncher:
    """Ray, started or joined at the first launch. A cluster this driver started itself cannot grow, so a stage
    whose workers can never fit there fails at once; one it joined (RAY_ADDRESS) may grow for them."""

    def __init__(self, job: JobSpec, tracking_uri: str, experiment_id: str, verbose: bool):
        self.job, self.tracking_uri, self.experiment_id, self.verbose = job, tracking_uri, experiment_id, verbose
        self.storage = storage_path(job.workdir)
        self.board = self.tracking_actor = None
        self.can_grow = bool(os.environ.get("RAY_ADDRESS"))

    def resumable(self, stage: str, run_id: str) -> bool:
        """Whether Ray Train's storage holds checkpoints of this stage run."""
        return storage_holds(self.storage, ray_run_name(self.job.name, stage, run_id))

    def prepare(self) -> None:
        """Ray, the board and the tracking actor, before the first launch (on the driver's own thread)."""
        if self.board is not None:
            return
        from kdpipe.worker.progress import open_board
        from kdpipe.worker.tracking_actor import open_tracking_actor

        ensure_ray(self.verbose)
        self.board = open_board(self.job.name)
        self.tracking_actor = open_tracking_actor(self.job.name, self.tracking_uri)

    def launch(self, task: StageTask, stage: PlannedStage) -> dict[str, Any]:
        """Train the stage; returns the values its search chose (none for a stage without a search)."""
        if not self.can_grow:
            check_fits(stage.spec.workers, cluster_nodes())
        restarts = self.job.checkpoint.max_restarts
        if stage.spec.search is None:
            launch_stage(task, stage.spec.workers, self.storage, restarts)
            return {}
        from kdpipe.driver.search.run import run_search  # Ray Tune: only for a search
        from kdpipe.driver.search.task import SearchTask

        search = SearchTask(task, self.experiment_id, stage.spec.workers, self.storage, self.job.checkpoint)
        return run_search(search, ray_run_name(self.job.name, stage.spec.name, task.run_id))

    def progress(self) -> dict[str, dict]:
        """What each running stage's rank 0 (and each search) last reported to the board."""
        if self.board is None:
            return {}
        import ray

        return ray.get(self.board.snapshot.remote())

    def close(self) -> None:
        if self.board is not None:
            import ray

            ray.kill(self.board)
            ray.kill(self.tracking_actor)
