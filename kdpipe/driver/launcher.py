"""How `kdpipe run` launches stages: on Ray, with the job's progress board, tracking actor and orphan sweeper
beside them. Ray is imported at the first launch: a rerun that reuses every stage never imports it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from kdpipe.driver.capacity import check_fits, cluster_nodes, per_worker
from kdpipe.driver.launch import ensure_ray, launch_stage, ray_run_name, storage_holds, storage_path, train_settings
from kdpipe.job.spec import JobSpec, WorkersSpec
from kdpipe.plan import PlannedStage
from kdpipe.worker.task import StageTask

# How long a stage's workers may wait to be placed (`workers.start_timeout` sets it): on the cluster this driver
# started, nothing else holds what it admitted them to; a joined cluster may be busy with other jobs, or growing.
DEADLINE_SECONDS, GROWING_DEADLINE_SECONDS = 300.0, 1800.0
ADMIT_SECONDS = 1.0  # how often a stage that waits for its turn looks at the cluster again (it may have grown)
BOARD_SECONDS = 10.0  # the progress board's answer: a busy board skips one look at the progress


class RayLauncher:
    """Ray, started or joined at the first launch. A cluster this driver started itself cannot grow, so a stage
    whose workers can never fit there fails at once; one it joined (RAY_ADDRESS) may grow for them.

    A stage is launched when what it asks for fits beside what this driver's running stages ask for in what the
    cluster holds now, or when none runs (a cluster that can grow grows for it): so the only wait on Ray's
    placement is for what other jobs hold or a cluster still growing, and that wait has a deadline."""

    def __init__(self, job: JobSpec, tracking_uri: str, experiment_id: str, verbose: bool):
        self.job, self.tracking_uri, self.experiment_id, self.verbose = job, tracking_uri, experiment_id, verbose
        self.storage = storage_path(job.workdir)
        self.board = self.tracking_actor = self.sweeper = None
        self.can_grow = bool(os.environ.get("RAY_ADDRESS"))
        self.turns = threading.Condition()
        self.asks: dict[str, dict[str, float]] = {}  # by stage: what each launched stage holds

    def resumable(self, stage: str, run_id: str) -> bool:
        """Whether Ray Train's storage holds checkpoints of this stage run."""
        return storage_holds(self.storage, ray_run_name(self.job.name, stage, run_id))

    def prepare(self) -> None:
        """Ray, the board, the tracking actor and the sweeper, before the first launch (on the driver's thread)."""
        if self.board is not None:
            return
        from kdpipe.driver.orphans import OrphanSweeper
        from kdpipe.worker.progress import open_board
        from kdpipe.worker.tracking_actor import open_tracking_actor

        ensure_ray(self.verbose)
        self.board = open_board(self.job.name)
        self.tracking_actor = open_tracking_actor(self.job.name, self.tracking_uri)
        self.sweeper = OrphanSweeper()

    def launch(self, task: StageTask, stage: PlannedStage) -> dict[str, Any]:
        """Train the stage once its turn comes; returns the values its search chose (none without a search)."""
        workers = stage.spec.workers
        if not self.can_grow:
            check_fits(workers, cluster_nodes())
        deadline = workers.start_timeout or (GROWING_DEADLINE_SECONDS if self.can_grow else DEADLINE_SECONDS)
        restarts = self.job.checkpoint.max_restarts
        if stage.spec.search is None:
            with self.turn(stage.spec.name, workers, 1):
                launch_stage(task, workers, self.storage, restarts, deadline)
            return {}
        from kdpipe.driver.search.run import run_search, trials_at_once  # Ray Tune: only for a search
        from kdpipe.driver.search.task import SearchTask

        at_once = trials_at_once(stage.spec.search, workers)
        search = SearchTask(
            task, self.experiment_id, workers, self.storage, self.job.checkpoint, deadline, train_settings(), at_once
        )
        with self.turn(stage.spec.name, workers, at_once):
            return run_search(search, ray_run_name(self.job.name, stage.spec.name, task.run_id))

    @contextlib.contextmanager
    def turn(self, stage: str, workers: WorkersSpec, groups: int) -> Iterator[None]:
        """Hold `groups` of the stage's worker groups in this driver's account of the cluster while the stage runs;
        wait until they fit beside the running stages' (or none runs)."""
        import ray

        from kdpipe.worker.progress import report_progress

        ask = {name: amount * workers.count * groups for name, amount in per_worker(workers).items()}
        queued = False
        with self.turns:
            while self.asks and not fits_beside(ask, list(self.asks.values()), ray.cluster_resources()):
                if not queued:
                    queued = True
                    report_progress(self.job.name, stage, queued=f"its turn comes after {', '.join(self.asks)}")
                self.turns.wait(ADMIT_SECONDS)
            self.asks[stage] = ask
        if queued:
            report_progress(self.job.name, stage, queued=None)
        try:
            yield
        finally:
            with self.turns:
                del self.asks[stage]
                self.turns.notify_all()

    def progress(self) -> dict[str, dict]:
        """What each running stage's rank 0 (and each search) last reported to the board."""
        if self.board is None:
            return {}
        import ray

        try:
            return ray.get(self.board.snapshot.remote(), timeout=BOARD_SECONDS)
        except ray.exceptions.GetTimeoutError:
            return {}

    def close(self) -> None:
        if self.board is not None:
            import ray

            self.sweeper.stop()
            ray.kill(self.board)
            ray.kill(self.tracking_actor)


def fits_beside(ask: dict[str, float], held: list[dict[str, float]], totals: dict[str, float]) -> bool:
    """Whether `ask` fits in `totals` beside everything `held` (resource by resource, over the whole cluster)."""
    taken = {name: sum(h.get(name, 0.0) for h in held) for name in ask}
    return all(amount + taken[name] <= totals.get(name, 0.0) + 1e-9 for name, amount in ask.items())
