"""The search's driver side: the Tune callback that records each trial's end in MLflow and on the progress board,
and ASHA on epochs that remembers a restored search."""

from __future__ import annotations

from types import SimpleNamespace

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from kdpipe.driver.search.task import EPOCHS_DONE, OBJECTIVE, SearchTask
from kdpipe.driver.search.trial import trial_id_of
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_PRUNED
from kdpipe.worker.progress import report_progress


class TrialLog(tune.Callback):
    """On the driver: a trial that ends before its last epoch was stopped by the scheduler, and its MLflow run
    ends KILLED, tagged pruned; the trials' counts and the best result so far go to the job's progress board."""

    def __init__(self, search: SearchTask):
        self.uri, self.experiment_id = search.stage.tracking_uri, search.experiment_id
        self.stage_run, self.epochs, self.mode = search.stage.run_id, search.epochs, search.spec.mode
        self.job, self.stage = search.stage.job, search.stage.stage.name
        self.progress = {"done": 0, "pruned": 0, "failed": 0, "running": 0, "best": None}

    def count_running(self, trials: list) -> None:
        """Counts trials running, then shows every count (each event that changes one ends here)."""
        self.progress["running"] = sum(t.status == "RUNNING" for t in trials)
        report_progress(self.job, self.stage, search=dict(self.progress))

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.count_running(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        best, value = self.progress["best"], result.get(OBJECTIVE)
        if value is not None and (best is None or (value > best if self.mode == "max" else value < best)):
            self.progress["best"] = value
            self.count_running(trials)

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
