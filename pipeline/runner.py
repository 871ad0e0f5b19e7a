"""Running a planned job: prepare data, then launch each stage as a Ray Train run (or, with a `search:` block, a
Ray Tune search of such runs) once its teachers are done.

One admission rule for stages and trials: a stage is launched as soon as its teachers are done, each from its own
driver thread, and Ray queues what does not fit. A Ray Train run waits for its placement group (Ray Train retries
the wait for as long as it takes), so independent stages overlap when the cluster has room, run one after another
when it does not, and on an autoscaling cluster their pending placement groups are the demand it scales for.
Nothing holds part of what another waits for (placement groups are granted whole; a Tune trial asks for no CPU),
so nothing deadlocks. A search runs `max_concurrent` trials at once: by default as many as the cluster holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import artifacts
from pipeline.data import prepare_data, steps_per_epoch
from pipeline.plan import Plan
from pipeline.spec import TeacherCacheMode, TopKCache, WorkersSpec
from pipeline.startup import collector_paused
from pipeline.task import StageTask, TeacherRef, run_stage
from pipeline.tracking import TAG_VALUES, Lease, Tracker, TrackingError, lease_seconds, run_is_live

TEACHER_CACHE = "teacher-cache"  # under the job's workdir: the teacher-output cache (`pipeline.teacher_cache`)
POLL_SECONDS = 2.0  # how often the driver looks at stages and progress: every poll takes CPU from training
# Ray Train's controller polls its workers every 2 s by default, so a stage's start and end each wait up to a poll;
# its preemption watcher (one more actor process per stage) only logs a node's drain notice, which a kdpipe stage
# survives through its checkpoints anyway. Both are Ray Train's own settings (set in the environment to change).
RAY_TRAIN_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Tune saves a search's state every second (a driver killed in between loses at most that); its own console
# output (the experiment's box, its paths) stays out of kdpipe's progress display.
TUNE_SETTINGS = {"TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_AIR_NEW_OUTPUT": "0"}


@dataclass
class StageOutcome:
    name: str
    method: str
    teachers: list[str]
    status: str = "pending"  # pending | waiting (another driver trains it) | running | done | reused | failed | skipped
    run_id: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    error: str = ""
    resumed: bool = False  # an interrupted run of this stage is continued in place
    chosen: dict = field(default_factory=dict)  # a searched stage: the values its best trial had

    @property
    def finished(self) -> bool:
        """Its final weights exist: trained now, or found in MLflow from an earlier run."""
        return self.status in ("done", "reused")


def ensure_ray(verbose: bool) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one on this machine's cores.

    The driver's MLFLOW_* settings (credentials, timeouts, retries) go to every worker: they log to MLflow too.
    """
    import ray

    for key, value in {**RAY_TRAIN_SETTINGS, **TUNE_SETTINGS}.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    mlflow_env = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    ray.init(
        address=address,
        runtime_env={"env_vars": mlflow_env} if mlflow_env else None,
        log_to_driver=verbose,
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without it, the
        # placement group of a trial Tune stopped is never freed and the next trial waits forever.
        include_dashboard=None,
        configure_logging=verbose,
        logging_level="INFO" if verbose else "ERROR",
    )


def ray_run_name(job: str, stage: str, run_id: str) -> str:
    """One Ray Train run per MLflow stage run: a rerun that resumes the MLflow run finds Ray's own checkpoints."""
    return f"{job}-{stage}-{run_id}"


def workdir_path(workdir: str, name: str) -> str:
    """WORKDIR/name: a local folder (absolute: workers run elsewhere) or a URL."""
    if "://" in workdir:
        return f"{workdir.rstrip('/')}/{name}"
    return str(Path(workdir).resolve() / name)


def teacher_cache_settings(mode: TeacherCacheMode, workdir: str) -> tuple[str, int]:
    """A stage task's teacher-output cache: its root ("" when off) and how many logits it keeps (0: all)."""
    if mode == "off":
        return "", 0
    return workdir_path(workdir, TEACHER_CACHE), mode.top_k if isinstance(mode, TopKCache) else 0


def storage_path(workdir: str) -> str:
    """Ray Train's storage for the job."""
    return workdir_path(workdir, "ray")


def storage_holds(storage: str, name: str) -> bool:
    """Whether Ray Train's storage has a run folder `name`, on a local disk or in a bucket."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
    return filesystem.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.Directory


def launch_stage(
    task: StageTask, workers: WorkersSpec, storage: str, restarts: int, callbacks: list | None = None
) -> None:
    """One stage (or one trial of a search) as one Ray Train run, whose worker group Ray Train restarts up to
    `restarts` times after a failure; raises if it failed."""
    with collector_paused():  # Ray Train's import, the first time in this process
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig

        from pipeline.trainer import StageTrainer

    use_gpu = workers.gpus > 0
    trainer = StageTrainer(
        run_stage,
        train_loop_config={"task": task},
        scaling_config=ScalingConfig(
            num_workers=workers.count,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": workers.cpus, **({"GPU": workers.gpus} if use_gpu else {})},
            placement_strategy=workers.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_run_name(task.job, task.config["name"], task.run_id),
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # A dead worker restarts the whole group from the latest checkpoint (`ray.train.get_checkpoint()`).
            failure_config=FailureConfig(max_failures=restarts),
            callbacks=callbacks,
        ),
    )
    trainer.fit()


def run_job(
    plan: Plan,
    *,
    force: tuple[str, ...] = (),
    verbose: bool = False,
    on_poll: Callable[[dict[str, StageOutcome], dict], None] | None = None,
) -> dict[str, StageOutcome]:
    """Run every stage that has not run with these exact inputs; `force` retrains the named stages and everything
    downstream of them in new MLflow runs (the old runs and their artifacts stay). Ray starts only once a stage
    has to train."""
    runner = JobRunner(plan, verbose)
    try:
        return runner.run(force, on_poll)
    finally:
        runner.release()


class JobRunner:
    """One `kdpipe run` of a job: which stages to reuse, resume, wait for or train, and their launches."""

    def __init__(self, plan: Plan, verbose: bool):
        self.plan, self.job, self.verbose = plan, plan.job, verbose
        self.data = prepare_data(self.job.data)
        self.prints = plan.fingerprints(self.data.identity)
        self.tracker = Tracker(self.job.tracking.uri)
        self.experiment = self.tracker.experiment_id(self.job.tracking.experiment)
        self.parent = self.tracker.start_job_run(self.experiment, self.job.name, self.job.model_dump(), plan.settings)
        self.storage = storage_path(self.job.workdir)
        self.outcomes = {
            name: StageOutcome(name, stage.spec.method, stage.spec.teachers, fingerprint=self.prints[name])
            for name, stage in ((name, plan.stages[name]) for name in plan.order)
        }
        self.running: dict[Future, str] = {}
        self.board = self.tracking_actor = None
        self.renewed = time.monotonic()

    def run(self, force: tuple[str, ...], on_poll) -> dict[str, StageOutcome]:
        forced = set().union(*(self.plan.downstream(n) for name in force for n in self.plan.named(name)))
        for name in self.plan.order:
            if name not in forced:
                self.look_up(self.outcomes[name])
        # Stages that more stages wait on go first: a teacher before an independent baseline.
        launch_order = sorted(self.plan.order, key=lambda n: -len(self.plan.downstream(n)))
        with ThreadPoolExecutor(max_workers=len(self.plan.order)) as pool:
            while any(o.status in ("pending", "waiting", "running") for o in self.outcomes.values()):
                for name in launch_order:
                    self.advance(self.outcomes[name], pool)
                # With nothing running (every stage left waits on another driver), `wait([])` would return at
                # once: sleep instead of spinning a core against the stages the other driver trains.
                if self.running:
                    done, _ = wait(list(self.running), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                else:
                    done = set()
                    time.sleep(POLL_SECONDS)
                for future in done:
                    self.finish(future)
                self.renew_leases()
                if on_poll:
                    on_poll(self.outcomes, self.progress())
        ok = all(o.finished for o in self.outcomes.values())
        with contextlib.suppress(TrackingError):  # a tracking outage is already each stage's reported error
            self.log_report()
            self.tracker.finish(self.parent, "FINISHED" if ok else "FAILED")
        return self.outcomes

    def log_report(self) -> None:
        """The job's report into its job run. Its plot only when this run trained something: a rerun that
        reused every stage draws the same picture, and matplotlib's import would be most of its few seconds."""
        from pipeline.report import job_results, log_report

        results = job_results(self.plan, {name: o.metrics if o.finished else None for name, o in self.outcomes.items()})
        drawn = any(o.status not in ("reused", "skipped") for o in self.outcomes.values())
        log_report(self.tracker, self.parent, f"kdpipe job '{self.job.name}'", results, self.job.baseline, drawn)

    def look_up(self, outcome: StageOutcome) -> None:
        """Reuse a finished run of this exact stage (same fingerprint); wait for one another driver is training;
        resume an interrupted one that left a checkpoint (in MLflow, or in Ray Train's storage); otherwise the
        stage trains from scratch."""
        tracker = self.tracker
        found = tracker.find_finished_stage(self.experiment, outcome.fingerprint, artifacts.FINAL_WEIGHTS)
        if found:
            outcome.status, (outcome.run_id, outcome.metrics) = "reused", found
            tracker.set_tags(self.parent, {f"kdpipe.reused.{outcome.name}": outcome.run_id})
            if self.plan.stages[outcome.name].spec.search:
                outcome.chosen = json.loads(tracker.get_run(outcome.run_id).data.tags[TAG_VALUES])
            return
        interrupted = tracker.find_interrupted_stage(self.experiment, outcome.fingerprint)
        if interrupted is None:
            return
        run_id = interrupted.info.run_id
        if run_is_live(interrupted):
            outcome.status, outcome.run_id = "waiting", run_id
            outcome.error = f"run {run_id} is being trained {Lease.of(interrupted).describe()}"
        elif artifacts.stored_checkpoints(tracker.artifacts(run_id)) or storage_holds(
            self.storage, ray_run_name(self.job.name, outcome.name, run_id)
        ):
            outcome.run_id, outcome.resumed = run_id, True

    def advance(self, outcome: StageOutcome, pool: ThreadPoolExecutor) -> None:
        """Move a stage on if it can: skip it, see whether the run it waits for ended, or start it."""
        if outcome.status == "waiting":
            self.check_waiting(outcome)
        if outcome.status != "pending":
            return
        teachers = [self.outcomes[t].status for t in outcome.teachers]
        if any(s in ("failed", "skipped") for s in teachers):
            outcome.status, outcome.error = "skipped", "a teacher stage did not finish"
        elif all(self.outcomes[t].finished for t in outcome.teachers):
            self.start(outcome, pool)

    def check_waiting(self, outcome: StageOutcome) -> None:
        """A run another driver holds: reuse it once it finished; look again once its driver is gone."""
        try:
            run = self.tracker.get_run(outcome.run_id)
        except TrackingError:
            return
        if run_is_live(run):
            return
        outcome.status, outcome.run_id, outcome.error = "pending", "", ""
        self.look_up(outcome)

    def start(self, outcome: StageOutcome, pool: ThreadPoolExecutor) -> None:
        name, job, tracker = outcome.name, self.job, self.tracker
        stage = self.plan.stages[name]
        workers = stage.spec.workers.count
        if steps_per_epoch(self.data, job.data.batch_size, workers) == 0:
            outcome.status = "failed"
            outcome.error = (
                f"data: the training split gives no full batch of {job.data.batch_size} per worker with "
                f"{workers} workers; lower data.batch_size or the stage's workers.count"
            )
            return
        teacher_runs = {t: self.outcomes[t].run_id for t in stage.spec.teachers}
        try:
            if not self.claim(outcome, stage.config, teacher_runs):
                return
            teachers = tuple(TeacherRef(t, run, tracker.artifact_uri(run)) for t, run in teacher_runs.items())
            artifact_uri = tracker.artifact_uri(outcome.run_id)
        except TrackingError as err:
            outcome.status, outcome.error = "failed", str(err)
            return
        if self.board is None:
            self.start_ray()
        task = StageTask(
            job.name,
            stage.config,
            self.data,
            job.data,
            teachers,
            tracker.uri,
            outcome.run_id,
            artifact_uri,
            stage.seed,
            job.checkpoint,
            *teacher_cache_settings(stage.teacher_cache(job), job.workdir),
        )
        outcome.status, outcome.seconds = "running", time.perf_counter()
        if stage.spec.search is None:
            future = pool.submit(launch_stage, task, stage.spec.workers, self.storage, job.checkpoint.max_restarts)
        else:
            from pipeline.search import SearchTask, run_search

            search = SearchTask(task, self.experiment, stage.spec.workers, self.storage, job.checkpoint)
            future = pool.submit(run_search, search, ray_run_name(job.name, name, outcome.run_id))
        self.running[future] = name

    def claim(self, outcome: StageOutcome, config: dict, teacher_runs: dict[str, str]) -> bool:
        """Hold the stage's run (a new one, or the interrupted one to resume); False when another driver holds
        it instead, and the stage then waits for that driver."""
        tracker = self.tracker
        if outcome.resumed:
            if not tracker.take_over(outcome.run_id):
                outcome.status, outcome.resumed = "waiting", False
                return False
            tracker.reopen(outcome.run_id, self.parent, outcome.name)
            return True
        seed = self.plan.stages[outcome.name].seed
        outcome.run_id = tracker.start_stage_run(
            self.experiment, self.parent, self.job.name, outcome.name, outcome.fingerprint, config, teacher_runs, seed
        )
        first = tracker.first_live_run(self.experiment, outcome.fingerprint)
        if first is not None and first.info.run_id != outcome.run_id:  # another driver created one first
            tracker.discard(outcome.run_id)
            outcome.status, outcome.run_id = "waiting", first.info.run_id
            outcome.error = f"run {first.info.run_id} is being trained {Lease.of(first).describe()}"
            return False
        return True

    def start_ray(self) -> None:
        from pipeline.progress import open_board
        from pipeline.tracking_actor import open_tracking_actor

        ensure_ray(self.verbose)
        self.board = open_board(self.job.name)
        self.tracking_actor = open_tracking_actor(self.job.name, self.tracker.uri)

    def finish(self, future: Future) -> None:
        name = self.running.pop(future)
        outcome = self.outcomes[name]
        outcome.seconds = time.perf_counter() - outcome.seconds
        try:
            outcome.chosen = future.result() or {}
            outcome.status = "done"
        except Exception as err:  # a failed stage fails its descendants, never its siblings
            outcome.status, outcome.error = "failed", one_line(err)
        try:
            self.tracker.finish(outcome.run_id, "FINISHED" if outcome.status == "done" else "FAILED")
            outcome.metrics = self.tracker.latest_metrics(outcome.run_id)  # all epochs' metrics, resumed or not
        except TrackingError as err:  # the run stays RUNNING in MLflow; a rerun resumes it
            outcome.status, outcome.error = "failed", outcome.error or str(err)

    def renew_leases(self) -> None:
        """The heartbeat of every run this driver trains, a few times per lease."""
        if time.monotonic() - self.renewed < lease_seconds() / 3:
            return
        self.renewed = time.monotonic()
        with contextlib.suppress(TrackingError):  # an outage fails the stage itself; a missed beat is not fatal
            self.tracker.renew([self.outcomes[name].run_id for name in self.running.values()])

    def progress(self) -> dict:
        """What the running stages' rank 0 last reported, and each running search's trial counts."""
        import ray

        live = ray.get(self.board.snapshot.remote()) if self.board is not None else {}
        if any(self.plan.stages[name].spec.search for name in self.running.values()):
            from pipeline.search import PROGRESS

            for name in self.running.values():
                if self.outcomes[name].run_id in PROGRESS:
                    live[name] = {"search": dict(PROGRESS[self.outcomes[name].run_id])}
        return live

    def release(self) -> None:
        """On the way out: runs still held (an interrupt, an error) may be taken over at once; the board and the
        tracking actor go."""
        with contextlib.suppress(TrackingError):
            for name in self.running.values():
                self.tracker.release(self.outcomes[name].run_id)
        if self.board is not None:
            import ray

            ray.kill(self.board)
            ray.kill(self.tracking_actor)


def one_line(err: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) failure, as one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"
