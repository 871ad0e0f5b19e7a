"""A searched stage: Ray Tune around the stage, each trial the stage itself with sampled values.

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

from typing import Any

import ray
from ray import tune

from kdpipe.driver.search.record import record_search
from kdpipe.driver.search.scheduler import ResumableASHA, TrialLog
from kdpipe.driver.search.space import tune_space
from kdpipe.driver.search.task import OBJECTIVE, SearchTask
from kdpipe.driver.search.trial import run_trial
from kdpipe.errors import one_line
from kdpipe.job.spec import SearchSpec, WorkersSpec
from kdpipe.tracking.store import Tracker

# A trial only waits on its Train run. It must hold nothing its workers need: a fraction of a CPU would keep a
# cluster that fits exactly one trial from ever placing that trial's workers. One byte of memory places it anywhere.
TRIAL_RESOURCES = {"memory": 1}


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
    from kdpipe.worker.entry import fill_cache
    from kdpipe.worker.teacher_cache import complete

    task, workers = search.stage, search.workers
    if complete(task.cache.root, task.cache_keys(workers.count), search.epochs, workers.count):
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
    if search.stage.cache is not None:
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
                max_concurrent_trials=search.at_once,
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
    errors = tuner.fit().errors
    last_failure = one_line(errors[-1]) if errors else ""
    return record_search(search, {trial.trial_id for trial in tune.ExperimentAnalysis(path).trials}, last_failure)
