"""A search's result in the stage's run: the best completed trial's weights, metrics and values, and two plots."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kdpipe.driver.search.task import SearchTask
from kdpipe.driver.search.trial import trial_id_of
from kdpipe.errors import UserError
from kdpipe.job.spec import SearchSpec
from kdpipe.tracking.files import RunArtifacts
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_BEST_TRIAL, TAG_PRUNED, TAG_VALUES
from kdpipe.worker import artifacts
from kdpipe.worker.task import StageTask

CHOSEN = "search.best."  # the stage run's params: the values of its best trial, whose weights it holds


def record_search(search: SearchTask, trial_ids: set[str], last_failure: str) -> dict[str, Any]:
    """The best completed trial becomes the stage's result: its weights and final metrics in the stage's run, its
    values as params and `search/best.json`, its run id as a tag; the two plots; trial runs Tune never recorded
    (started by a driver killed before Tune saved them) are deleted, so the search keeps exactly its trials. With
    no trial completed, the search fails in one line with its trials' `last_failure` ("" if none failed)."""
    task, spec = search.stage, search.spec
    tracker = Tracker(task.tracking_uri)
    runs = tracker.trial_runs(search.experiment_id, task.run_id)
    for run in [run for run in runs if trial_id_of(run) not in trial_ids]:
        tracker.discard(run.info.run_id)
    runs = [run for run in runs if trial_id_of(run) in trial_ids]
    finished = [run for run in runs if run.info.status == "FINISHED" and spec.metric in run.data.metrics]
    if not finished:
        last = f" (the last failure: {last_failure})" if last_failure else ""
        raise UserError(f"search: none of its {len(runs)} trials completed{last}; see the trial runs in MLflow")
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
    tracker.log_text(task.run_id, best_json, artifacts.SEARCH_BEST)
    plot_search(tracker, task, spec, runs)
    return values


def plot_search(tracker: Tracker, task: StageTask, spec: SearchSpec, runs: list) -> None:
    """`plots/search_epochs.png`: every trial's metric per epoch (pruned ones cut short, marked x);
    `plots/search_values.png`: the metric against each searched value (pruned trials hollow, at their last)."""
    from kdpipe.plots import plot_search_epochs, plot_search_values

    trials = []
    for run in runs:
        history = tracker.metric_history(run.info.run_id, [spec.metric])[spec.metric]
        if history:
            values = json.loads(run.data.tags[TAG_VALUES])
            trials.append((run.data.tags.get("mlflow.runName", ""), history, TAG_PRUNED in run.data.tags, values))
    with tempfile.TemporaryDirectory() as folder:
        epochs_plot = plot_search_epochs(trials, spec.metric, task.stage.name, Path(folder) / "search_epochs.png")
        values_plot = plot_search_values(trials, spec.metric, task.stage.name, Path(folder) / "search_values.png")
        RunArtifacts(task.artifact_uri, task.tracking_uri).log_files([epochs_plot, values_plot], artifacts.PLOTS)
