"""Running a planned job: prepare data, then launch each stage as a Ray Train run once its teachers are done.

Stages with no path between them run side by side, each its own `TorchTrainer` started from a driver thread,
as long as the cluster has CPUs and GPUs free for their workers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import artifacts
from pipeline.data import prepare_data, steps_per_epoch
from pipeline.plan import Plan
from pipeline.spec import CheckpointSpec, WorkersSpec
from pipeline.task import StageTask, TeacherRef, run_stage
from pipeline.tracking import Tracker, TrackingError

POLL_SECONDS = 2.0  # how often the driver looks at stages and progress: every poll takes CPU from training
# Ray Train's controller polls its workers every 2 s by default, so a stage's start and end each wait up to a poll;
# its preemption watcher (one more actor process per stage) only logs a node's drain notice, which a kdpipe stage
# survives through its checkpoints anyway. Both are Ray Train's own settings (set in the environment to change).
RAY_TRAIN_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass
class StageOutcome:
    name: str
    method: str
    teachers: list[str]
    status: str = "pending"  # pending | running | done | reused | failed | skipped
    run_id: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    error: str = ""
    resumed: bool = False  # an interrupted run of this stage is continued in place

    @property
    def finished(self) -> bool:
        """Its final weights exist: trained now, or found in MLflow from an earlier run."""
        return self.status in ("done", "reused")


def ensure_ray(verbose: bool) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one on this machine's cores.

    The driver's MLFLOW_* settings (credentials, timeouts, retries) go to every worker: they log to MLflow too.
    """
    import ray

    for key, value in RAY_TRAIN_SETTINGS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    mlflow_env = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    ray.init(
        address=address,
        runtime_env={"env_vars": mlflow_env} if mlflow_env else None,
        log_to_driver=verbose,
        include_dashboard=False if not address else None,
        configure_logging=verbose,
        logging_level="INFO" if verbose else "ERROR",
    )


def worker_demand(workers: WorkersSpec) -> tuple[float, float]:
    return workers.count * workers.cpus, workers.count * workers.gpus


def ray_run_name(job: str, stage: str, run_id: str) -> str:
    """One Ray Train run per MLflow stage run: a rerun that resumes the MLflow run finds Ray's own checkpoints."""
    return f"{job}-{stage}-{run_id}"


def storage_path(workdir: str) -> str:
    """Ray Train's storage for the job: WORKDIR/ray, a local folder (absolute: workers run elsewhere) or a URL."""
    if "://" in workdir:
        return workdir.rstrip("/") + "/ray"
    return str(Path(workdir).resolve() / "ray")


def storage_holds(storage: str, name: str) -> bool:
    """Whether Ray Train's storage has a run folder `name`, on a local disk or in a bucket."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
    return filesystem.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.Directory


def launch_stage(task: StageTask, workers: WorkersSpec, storage: str, checkpointing: CheckpointSpec) -> None:
    """One stage as one Ray Train run; raises if it failed."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = workers.gpus > 0
    trainer = TorchTrainer(
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
            failure_config=FailureConfig(max_failures=checkpointing.max_restarts),
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
    downstream of them in new MLflow runs (the old runs and their artifacts stay)."""
    job = plan.job
    data = prepare_data(job.data)
    prints = plan.fingerprints(data.identity)
    tracker = Tracker(job.tracking.uri)
    experiment = tracker.experiment_id(job.tracking.experiment)
    parent = tracker.start_job_run(experiment, job.name, job.model_dump())
    outcomes = {
        name: StageOutcome(
            name, plan.stages[name].spec.method, plan.stages[name].spec.teachers, fingerprint=prints[name]
        )
        for name in plan.order
    }
    storage = storage_path(job.workdir)
    forced = set().union(*(plan.downstream(name) for name in force))
    for name in plan.order:
        if name not in forced:
            find_earlier_run(tracker, experiment, parent, outcomes[name], job.name, storage)
    if all(o.status == "reused" for o in outcomes.values()):  # nothing to train: no Ray to start
        if on_poll:
            on_poll(outcomes, {})
        tracker.finish(parent)
        return outcomes
    ensure_ray(verbose)
    import ray

    from pipeline.progress import open_board

    board = open_board(job.name)
    capacity = ray.cluster_resources()
    free = [capacity.get("CPU", 0.0), capacity.get("GPU", 0.0)]
    running: dict[Future, str] = {}

    def start(name: str, pool: ThreadPoolExecutor) -> None:
        stage = plan.stages[name]
        outcome = outcomes[name]
        workers = stage.spec.workers.count
        if steps_per_epoch(data, job.data.batch_size, workers) == 0:
            outcome.status = "failed"
            outcome.error = (
                f"data: the training split gives no full batch of {job.data.batch_size} per worker with "
                f"{workers} workers; lower data.batch_size or the stage's workers.count"
            )
            return
        teacher_runs = {t: outcomes[t].run_id for t in stage.spec.teachers}
        try:
            if outcome.resumed:
                tracker.reopen(outcome.run_id, parent, name)
            else:
                outcome.run_id = tracker.start_stage_run(
                    experiment, parent, job.name, name, prints[name], stage.config, teacher_runs
                )
        except TrackingError as err:
            outcome.status, outcome.error = "failed", str(err)
            return
        task = StageTask(
            job.name,
            stage.config,
            data,
            job.data,
            tuple(TeacherRef(t, run) for t, run in teacher_runs.items()),
            tracker.uri,
            outcome.run_id,
            job.seed,
            job.checkpoint,
        )
        outcome.status, outcome.seconds = "running", time.perf_counter()
        cpus, gpus = worker_demand(stage.spec.workers)
        free[0] -= cpus
        free[1] -= gpus
        running[pool.submit(launch_stage, task, stage.spec.workers, storage, job.checkpoint)] = name

    def finish(future: Future) -> None:
        name = running.pop(future)
        outcome = outcomes[name]
        outcome.seconds = time.perf_counter() - outcome.seconds
        cpus, gpus = worker_demand(plan.stages[name].spec.workers)
        free[0] += cpus
        free[1] += gpus
        try:
            future.result()
            outcome.status = "done"
        except Exception as err:  # a failed stage fails its descendants, never its siblings
            outcome.status, outcome.error = "failed", one_line(err)
        try:
            tracker.finish(outcome.run_id, "FINISHED" if outcome.status == "done" else "FAILED")
            outcome.metrics = tracker.latest_metrics(outcome.run_id)  # all epochs' metrics, resumed or not
        except TrackingError as err:  # the run stays RUNNING in MLflow; a rerun resumes it
            outcome.status, outcome.error = "failed", outcome.error or str(err)

    # Stages that more stages wait on go first: a teacher before an independent baseline.
    launch_order = sorted(plan.order, key=lambda n: -len(plan.downstream(n)))
    with ThreadPoolExecutor(max_workers=len(plan.order)) as pool:
        while any(o.status in ("pending", "running") for o in outcomes.values()):
            for name in launch_order:
                outcome = outcomes[name]
                if outcome.status != "pending":
                    continue
                teachers = [outcomes[t].status for t in outcome.teachers]
                if any(s in ("failed", "skipped") for s in teachers):
                    outcome.status, outcome.error = "skipped", "a teacher stage did not finish"
                elif all(outcomes[t].finished for t in outcome.teachers):
                    cpus, gpus = worker_demand(plan.stages[name].spec.workers)
                    if not running or (cpus <= free[0] + 1e-9 and gpus <= free[1] + 1e-9):
                        start(name, pool)
            done, _ = wait(list(running), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                finish(future)
            if on_poll:
                on_poll(outcomes, ray.get(board.snapshot.remote()))
    ok = all(o.finished for o in outcomes.values())
    with contextlib.suppress(TrackingError):  # a tracking outage is already each stage's reported error
        tracker.finish(parent, "FINISHED" if ok else "FAILED")
    ray.kill(board)
    return outcomes


def find_earlier_run(
    tracker: Tracker, experiment: str, parent: str, outcome: StageOutcome, job: str, storage: str
) -> None:
    """Reuse a finished run of this exact stage (same fingerprint), or resume an interrupted one that left a
    checkpoint (in MLflow, or in Ray Train's storage); otherwise the stage trains from scratch."""
    found = tracker.find_finished_stage(experiment, outcome.fingerprint, artifacts.FINAL_WEIGHTS)
    if found:
        outcome.status, (outcome.run_id, outcome.metrics) = "reused", found
        tracker.set_tags(parent, {f"kdpipe.reused.{outcome.name}": outcome.run_id})
        return
    interrupted = tracker.find_interrupted_stage(experiment, outcome.fingerprint)
    if interrupted is None:
        return
    run_id = interrupted.info.run_id
    if artifacts.stored_checkpoints(tracker, run_id) or storage_holds(storage, ray_run_name(job, outcome.name, run_id)):
        outcome.run_id, outcome.resumed = run_id, True


def one_line(err: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) failure, as one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"
