"""One trial of a search: the stage with sampled values, as its own MLflow run and its own Ray Train run."""

from __future__ import annotations

import dataclasses
import os

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from kdpipe.driver.search.space import values_of
from kdpipe.driver.search.task import SearchTask, with_objective
from kdpipe.plan import with_values
from kdpipe.startup import collector_paused
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_TRIAL


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


def run_trial(config: dict, search: SearchTask) -> None:
    """Ray Tune's function trainable: one trial, as its own MLflow run and its own Ray Train run.

    A trial Tune restores after its driver died, or runs again after one of its workers died, runs this again with the
    same trial id: its MLflow run is found and continued (Train resumes from its checkpoints); one that had already
    finished only reports its result again."""
    task, spec = search.stage, search.spec
    os.environ.update(search.train_settings)
    with collector_paused():  # a trial's process starts here: Ray Train's import, opening the MLflow store
        from kdpipe.driver.launch import launch_stage

        tracker = Tracker(task.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    values = values_of(config, spec)
    trial = with_values(task.stage, values)
    existing = tracker.trial_runs(search.experiment_id, task.run_id, trial_id)
    if existing and existing[0].info.status == "FINISHED":
        tune.report(with_objective(tracker.latest_metrics(existing[0].info.run_id), spec.metric, search.epochs))
        return
    if existing:
        run = existing[0]
        tracker.mark_running(run.info.run_id)
    else:
        run = tracker.start_trial_run(
            search.experiment_id, task.run_id, task.job, task.stage.name, trial_id, values, trial.config
        )
    run_id = run.info.run_id
    trial_task = dataclasses.replace(
        task, stage=trial.spec, params=trial.params, run_id=run_id, artifact_uri=run.info.artifact_uri
    )
    # A failure ends the run FAILED on the driver (`TrialLog`): here, a trial stopped by ASHA can fail as it goes.
    # Ray Train never restarts a trial's workers; Tune restarts the trial instead (`run_search`). ASHA stops a trial
    # by killing its actor, and when the trial's workers die before its Train controller does, a controller allowed
    # to restart them would ask for a new placement group only to die with it (the driver's sweeper removes what
    # such a controller leaves: `kdpipe.driver.orphans`).
    launch_stage(
        trial_task, search.workers, search.storage, 0, search.deadline, [EpochResults(spec.metric, search.epochs)]
    )
    tracker.finish(run_id, "FINISHED")
    tune.report(with_objective(tracker.latest_metrics(run_id), spec.metric, search.epochs))


def trial_id_of(run) -> str:
    return run.data.tags.get(TAG_TRIAL, "")
