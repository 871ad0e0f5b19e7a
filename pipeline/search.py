"""A stage with a `search:` block: Ray Tune around the stage, each trial the stage itself with sampled values.

    driver: Tuner(run_trial, searcher, ASHA) ── trial (a Tune function, asking for no CPU or GPU)
                                                    └── TorchTrainer(run_stage): the stage's workers, its own
                                                        placement group, a Train callback passing each epoch's
                                                        result to Tune (mid-epoch checkpoint reports pass nothing)

The pattern Ray 2.60 documents for Train V2 (no `ray.train.*` call in the Tune function). Every trial is an MLflow
run nested under the stage's run; ASHA stops poor trials at epoch boundaries and a driver-side Tune callback marks
their runs KILLED and tagged pruned. The experiment lives under the job's workdir, named like the stage's Ray Train
run: a rerun of an interrupted search restores it (`Tuner.restore`), keeping finished and pruned trials and the
searcher's history, and each interrupted trial goes on in its own MLflow run from its checkpoint. When the search
ends, the best completed trial's weights become the stage's, so students learn from them.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline import artifacts
from pipeline.errors import UserError
from pipeline.plan import with_values
from pipeline.spec import CheckpointSpec, Dimension, SearchSpec, StageSpec, WorkersSpec
from pipeline.startup import collector_paused
from pipeline.task import StageTask
from pipeline.tracking import TAG_BEST_TRIAL, TAG_PRUNED, TAG_TRIAL, TAG_VALUES, RunArtifacts, Tracker

OBJECTIVE, EPOCHS_DONE = "objective", "epochs_done"  # what Tune sees: the search metric, and ASHA's clock
# A trial only waits on its Train run. It must hold nothing its workers need: a fraction of a CPU would keep a
# cluster that fits exactly one trial from ever placing that trial's workers. One byte of memory places it anywhere.
TRIAL_RESOURCES = {"memory": 1}
# Tune saves the experiment's state at most this often: a driver killed in between loses at most this much of it.
TUNE_CHECKPOINT_SECONDS = "1"
CHOSEN = "search.best."  # the stage run's params: the values of its best trial, whose weights it holds
PROGRESS: dict[str, dict] = {}  # stage run id -> counts and best so far, kept by the driver's `TrialLog`


@dataclass(frozen=True)
class SearchTask:
    """A searched stage as plain data for Ray: the stage's own task (its run is the parent of the trials')."""

    stage: StageTask
    experiment_id: str
    workers: WorkersSpec
    storage: str
    checkpoint: CheckpointSpec

    @property
    def spec(self) -> SearchSpec:
        return StageSpec.model_validate(self.stage.config).search

    @property
    def paths(self) -> list[str]:
        return list(self.spec.space)

    @property
    def epochs(self) -> int:
        return self.stage.config["epochs"]


def tune_space(search: SearchSpec) -> dict[str, Any]:
    """The space as Tune distributions, under plain keys `p0, p1, ...` (dotted paths mean nesting to Tune)."""
    return {f"p{i}": tune_distribution(dimension) for i, dimension in enumerate(search.space.values())}


def tune_distribution(dimension: Dimension) -> Any:
    low, high = dimension.low, dimension.high
    if dimension.distribution == "choice":
        return tune.choice(dimension.values)
    if dimension.distribution == "int":
        return tune.randint(int(low), int(high) + 1)  # randint's upper bound is excluded
    return tune.loguniform(low, high) if dimension.distribution == "loguniform" else tune.uniform(low, high)


def values_of(config: dict, search: SearchSpec) -> dict[str, Any]:
    """A trial's sampled values by their paths in the stage."""
    return {path: config[f"p{i}"] for i, path in enumerate(search.space)}


class EpochResults(TuneReportCallback):
    """Train -> Tune: each epoch's end result (rank 0's), with the search metric as `objective` and the epochs done
    as ASHA's clock. Mid-epoch checkpoint reports carry no metric and stay with Train. The last epoch's result is
    held back: `run_trial` reports it once the trial's weights are saved and its run finished, since ASHA stops a
    trial (kills its actor) on the result that reaches `max_t`."""

    def __init__(self, metric: str, epochs: int):
        super().__init__()
        self.metric, self.epochs = metric, epochs

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        result = metrics[0]
        if "epoch" not in result or result["epoch"] + 1 >= self.epochs:
            return
        super().after_report(run_context, [with_objective(result, self.metric, result["epoch"] + 1)], None)


def with_objective(result: dict, metric: str, epochs_done: int) -> dict:
    return {**result, OBJECTIVE: result[metric], EPOCHS_DONE: epochs_done}


def run_trial(config: dict, search: SearchTask) -> None:
    """Ray Tune's function trainable: one trial, as its own MLflow run and its own Ray Train run.

    A trial Tune restores after its driver died, or runs again after one of its workers died, runs this again with the
    same trial id: its MLflow run is found and continued (Train resumes from its checkpoints); one that had already
    finished only reports its result again."""
    task, spec = search.stage, search.spec
    with collector_paused():  # a trial's process starts here: Ray Train's import, opening the MLflow store
        from pipeline.runner import launch_stage

        tracker = Tracker(task.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    values = values_of(config, spec)
    trial = with_values(StageSpec.model_validate(task.config), values)
    existing = tracker.trial_runs(search.experiment_id, task.run_id, trial_id)
    if existing and existing[0].info.status == "FINISHED":
        tune.report(with_objective(tracker.latest_metrics(existing[0].info.run_id), spec.metric, search.epochs))
        return
    if existing:
        run = existing[0]
        tracker.client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = tracker.start_trial_run(
            search.experiment_id, task.run_id, task.job, task.config["name"], trial_id, values, trial.config
        )
    run_id = run.info.run_id
    trial_task = dataclasses.replace(task, config=trial.config, run_id=run_id, artifact_uri=run.info.artifact_uri)
    # A failure ends the run FAILED on the driver (`TrialLog`): here, a trial stopped by ASHA can fail as it goes.
    # Ray Train never restarts a trial's workers; Tune restarts the trial instead (`run_search`). ASHA stops a trial
    # by killing its actor, and when the trial's workers die before its Train controller does, a controller allowed
    # to restart them asks for a new placement group and dies before handing it to Ray Train's cleaner: nothing
    # removes it while the job lives, and every later trial waits for its CPUs forever.
    launch_stage(trial_task, search.workers, search.storage, 0, [EpochResults(spec.metric, search.epochs)])
    tracker.finish(run_id, "FINISHED")
    tune.report(with_objective(tracker.latest_metrics(run_id), spec.metric, search.epochs))


def trial_id_of(run) -> str:
    return run.data.tags.get(TAG_TRIAL, "")


class TrialLog(tune.Callback):
    """On the driver: a trial that ends before its last epoch was stopped by the scheduler, and its MLflow run
    ends KILLED, tagged pruned; counts and the best result so far for the progress display."""

    def __init__(self, search: SearchTask):
        self.uri, self.experiment_id = search.stage.tracking_uri, search.experiment_id
        self.stage_run, self.epochs, self.mode = search.stage.run_id, search.epochs, search.spec.mode

    @property
    def progress(self) -> dict:
        return PROGRESS.setdefault(self.stage_run, {"done": 0, "pruned": 0, "failed": 0, "running": 0, "best": None})

    def count_running(self, trials: list) -> None:
        self.progress["running"] = sum(t.status == "RUNNING" for t in trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.count_running(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        best, value = self.progress["best"], result.get(OBJECTIVE)
        if value is not None and (best is None or (value > best if self.mode == "max" else value < best)):
            self.progress["best"] = value

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        done = (trial.last_result or {}).get(EPOCHS_DONE, 0)
        if done < self.epochs:
            tracker = Tracker(self.uri)
            for run in tracker.trial_runs(self.experiment_id, self.stage_run, trial.trial_id):
                tracker.set_tags(run.info.run_id, {TAG_PRUNED: f"stopped by ASHA after epoch {done}"})
                tracker.finish(run.info.run_id, "KILLED")
            self.progress["pruned"] += 1
        else:
            self.progress["done"] += 1
        self.count_running(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        tracker = Tracker(self.uri)
        for run in tracker.trial_runs(self.experiment_id, self.stage_run, trial.trial_id):
            tracker.finish(run.info.run_id, "FAILED")
        self.progress["failed"] += 1
        self.count_running(trials)


class ResumableASHA(ASHAScheduler):
    """ASHA on epochs that remembers a restored search: `Tuner.restore` gives back the scheduler as it was when the
    search started (Tune saves its searcher's state, not its scheduler's), so before its first decision it reads
    every trial's metric per epoch back from the trial runs in MLflow, and cuts as if it had never stopped."""

    def __init__(self, search: SearchTask, **settings):
        super().__init__(time_attr=EPOCHS_DONE, **settings)
        self.search, self.replayed = search, False

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self.replayed:
            self.replayed = True
            self.replay()
        super().on_trial_add(tune_controller, trial)

    def replay(self) -> None:
        task, metric = self.search.stage, self.search.spec.metric
        tracker = Tracker(task.tracking_uri)
        sign = 1.0 if self.search.spec.mode == "max" else -1.0
        (bracket,) = self._brackets  # one bracket: plain ASHA
        for run in tracker.trial_runs(self.search.experiment_id, task.run_id):
            trial = SimpleNamespace(trial_id=trial_id_of(run))
            for epoch, value in tracker.metric_history(run.info.run_id, [metric])[metric]:
                bracket.on_result(trial, epoch + 1, sign * value)


def trials_at_once(search: SearchSpec, workers: WorkersSpec) -> int:
    """`max_concurrent`, or as many trials as the cluster holds at once (at least one: an autoscaling cluster with
    no workers yet grows for it)."""
    if search.max_concurrent:
        return search.max_concurrent
    capacity = ray.cluster_resources()
    fits = capacity.get("CPU", 0.0) // (workers.count * workers.cpus)
    if workers.gpus:
        fits = min(fits, capacity.get("GPU", 0.0) // (workers.count * workers.gpus))
    return max(1, int(fits))


def fill_teacher_cache(search: SearchTask) -> None:
    """Fill the teacher-output cache with every view the trials train on before any of them starts: trials running
    at once would otherwise each compute the teachers on a cold cache. One Ray task per rank, each with a stage
    worker's resources, skipped when the cache already holds every view (a restored search, a stage taught
    before). The stage's run records the teacher batches computed and read."""
    from pipeline.task import fill_cache
    from pipeline.teacher_cache import complete

    task, workers = search.stage, search.workers
    if complete(task.teacher_cache, task.teacher_cache_keys(workers.count), search.epochs, workers.count):
        return
    fill = ray.remote(fill_cache).options(num_cpus=workers.cpus, num_gpus=workers.gpus)
    counts = ray.get([fill.remote(task, rank, workers.count) for rank in range(workers.count)])
    totals = {f"search/{name}": sum(c[name] for c in counts) for name in counts[0]}
    Tracker(task.tracking_uri).log_metrics(task.run_id, totals, step=0)


def run_search(search: SearchTask, name: str) -> dict[str, Any]:
    """The whole search, new or restored, then its record in the stage's run; returns the chosen values, raises
    if no trial completed."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    spec = search.spec
    if search.stage.teacher_cache:
        fill_teacher_cache(search)
    trainable = tune.with_resources(tune.with_parameters(run_trial, search=search), TRIAL_RESOURCES)
    path = f"{search.storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        seed = spec.seed
        searcher = OptunaSearch(seed=seed) if spec.searcher == "tpe" else BasicVariantGenerator(random_state=seed)
        scheduler = None
        if spec.scheduler.name == "asha":
            scheduler = ResumableASHA(
                search,
                max_t=search.epochs,
                grace_period=min(spec.scheduler.grace_period, search.epochs),
                reduction_factor=spec.scheduler.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(spec),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode=spec.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=spec.trials,
                max_concurrent_trials=trials_at_once(spec, search.workers),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=search.storage,
                verbose=0,
                callbacks=[TrialLog(search)],
                # A trial whose worker died runs again and goes on from its last checkpoint (`run_trial`).
                failure_config=tune.FailureConfig(max_failures=search.checkpoint.max_restarts),
            ),
        )
    tuner.fit()
    return record_search(search, {trial.trial_id for trial in tune.ExperimentAnalysis(path).trials})


def record_search(search: SearchTask, trial_ids: set[str]) -> dict[str, Any]:
    """The best completed trial becomes the stage's result: its weights and final metrics in the stage's run, its
    values as params and `search/best.json`, its run id as a tag; the two plots; trial runs Tune never recorded
    (started by a driver killed before Tune saved them) are deleted, so the search keeps exactly its trials."""
    task, spec = search.stage, search.spec
    tracker = Tracker(task.tracking_uri)
    runs = tracker.trial_runs(search.experiment_id, task.run_id)
    for run in [run for run in runs if trial_id_of(run) not in trial_ids]:
        tracker.discard(run.info.run_id)
    runs = [run for run in runs if trial_id_of(run) in trial_ids]
    finished = [run for run in runs if run.info.status == "FINISHED" and spec.metric in run.data.metrics]
    if not finished:
        raise UserError(f"search: none of its {len(runs)} trials completed; see the trial runs in MLflow")
    sign = 1 if spec.mode == "max" else -1
    best = max(finished, key=lambda run: sign * run.data.metrics[spec.metric])
    values = json.loads(best.data.tags[TAG_VALUES])
    best_id = best.info.run_id
    best_files = RunArtifacts(best.info.artifact_uri, task.tracking_uri)
    stage_files = RunArtifacts(task.artifact_uri, task.tracking_uri)
    peers = [artifacts.weights_folder(peer) for peer in best_files.list_folder(artifacts.PEERS)]
    for folder in [artifacts.WEIGHTS, *peers]:
        with best_files.downloaded(folder) as local:
            stage_files.log_folder(local, folder)
    tracker.log_metrics(task.run_id, dict(best.data.metrics), step=search.epochs - 1)
    tracker.set_tags(task.run_id, {TAG_BEST_TRIAL: best_id, TAG_VALUES: best.data.tags[TAG_VALUES]})
    tracker.log_params(task.run_id, {f"{CHOSEN}{path}": value for path, value in values.items()})
    best_json = json.dumps({"trial_run": best_id, "metric": spec.metric, "values": values}, indent=1)
    tracker.client.log_text(task.run_id, best_json, artifacts.SEARCH_BEST)
    plot_search(tracker, task, spec, runs)
    return values


def plot_search(tracker: Tracker, task: StageTask, spec: SearchSpec, runs: list) -> None:
    """`plots/search_epochs.png`: every trial's metric per epoch (pruned ones cut short, marked x);
    `plots/search_values.png`: the metric against each searched value (pruned trials hollow, at their last)."""
    from pipeline.plots import plot_search_epochs, plot_search_values

    trials = []
    for run in runs:
        history = tracker.metric_history(run.info.run_id, [spec.metric])[spec.metric]
        if history:
            values = json.loads(run.data.tags[TAG_VALUES])
            trials.append((run.data.tags.get("mlflow.runName", ""), history, TAG_PRUNED in run.data.tags, values))
    with tempfile.TemporaryDirectory() as folder:
        epochs_plot = plot_search_epochs(trials, spec.metric, task.config["name"], Path(folder) / "search_epochs.png")
        values_plot = plot_search_values(trials, spec.metric, task.config["name"], Path(folder) / "search_values.png")
        RunArtifacts(task.artifact_uri, task.tracking_uri).log_files([epochs_plot, values_plot], artifacts.PLOTS)
