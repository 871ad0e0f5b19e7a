"""Launching on Ray: joining or starting the cluster, and each stage as one Ray Train run (or, with a `search:`
block, a Ray Tune search of such runs), with the job's progress board and tracking actor beside them.

A Ray Train run waits for its placement group in Ray Train's attempts, up to the stage's deadline, then fails in one
line; on an autoscaling cluster its pending placement group is the demand the cluster grows for. Nothing holds part
of what another waits for (placement groups are granted whole; a Tune trial asks for no CPU), so nothing
deadlocks; what a dead controller leaves, the driver's sweeper removes (`kdpipe.driver.orphans`).
"""

from __future__ import annotations

import os

from kdpipe.driver.capacity import WorkersNotPlaced, check_answers
from kdpipe.job.spec import WorkersSpec, workdir_path
from kdpipe.startup import collector_paused
from kdpipe.worker.entry import run_stage
from kdpipe.worker.task import StageTask

# Ray Train's controller polls its workers every 2 s by default, so a stage's start and end each wait up to a poll;
# its preemption watcher (one more actor process per stage) only logs a node's drain notice, which a kdpipe stage
# survives through its checkpoints anyway. Both are Ray Train's own settings (set in the environment to change).
# Ray Train waits for a worker group's placement in attempts of this many seconds, each a new placement group (the
# stage's deadline holds to within one: `kdpipe.driver.trainer.PlacementDeadline`).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RAY_TRAIN_SETTINGS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    START_TIMEOUT_ENV: "30",
}
# Tune saves a search's state every second (a driver killed in between loses at most that); its own console
# output (the experiment's box, its paths) stays out of kdpipe's progress display.
TUNE_SETTINGS = {"TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_AIR_NEW_OUTPUT": "0"}


def ensure_ray(verbose: bool) -> None:
    """Join the cluster named by RAY_ADDRESS (one line if it does not answer), or start a local one on this
    machine's cores: a new one, whatever cluster another `ray start` recorded on the machine.

    The driver's MLFLOW_* settings (credentials, timeouts, retries) go to every worker: they log to MLflow too.
    """
    import ray

    for key, value in {**RAY_TRAIN_SETTINGS, **TUNE_SETTINGS}.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_answers(address)
    mlflow_env = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    ray.init(
        address=address or "local",
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


def storage_path(workdir: str) -> str:
    """Ray Train's and Ray Tune's storage for the job."""
    return workdir_path(workdir, "ray")


def storage_holds(storage: str, name: str) -> bool:
    """Whether Ray Train's storage has a run folder `name`, on a local disk or in a bucket."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
    return filesystem.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.Directory


def train_settings() -> dict[str, str]:
    """The Ray Train settings in this process's environment: a search hands them to its trials, whose processes
    start Ray Train runs of their own."""
    return {key: os.environ[key] for key in RAY_TRAIN_SETTINGS if key in os.environ}


def launch_stage(
    task: StageTask,
    workers: WorkersSpec,
    storage: str,
    restarts: int,
    deadline: float,
    callbacks: list | None = None,
) -> None:
    """One stage (or one trial of a search) as one Ray Train run, whose worker group Ray Train restarts up to
    `restarts` times after a failure; raises if it failed, in one line (`WorkersNotPlaced`) if its workers were
    not placed within `deadline` seconds."""
    with collector_paused():  # Ray Train's import, the first time in this process
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig
        from ray.train.v2.api.exceptions import ControllerError

        from kdpipe.driver.trainer import StageTrainer

    use_gpu = workers.gpus > 0
    trainer = StageTrainer(
        run_stage,
        workers=workers,
        deadline=deadline,
        train_loop_config={"task": task},
        scaling_config=ScalingConfig(
            num_workers=workers.count,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": workers.cpus, **({"GPU": workers.gpus} if use_gpu else {})},
            placement_strategy=workers.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_run_name(task.job, task.stage.name, task.run_id),
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # A dead worker restarts the whole group from the latest checkpoint (`ray.train.get_checkpoint()`).
            failure_config=FailureConfig(max_failures=restarts),
            callbacks=callbacks,
        ),
    )
    try:
        trainer.fit()
    except ControllerError as err:
        if isinstance(err.controller_failure, WorkersNotPlaced):
            raise err.controller_failure from None
        raise
