"""After training: a finished stage's MLflow Model registered, exported or evaluated (`kdpipe register`, `export`,
`eval`). A stage is found as `kdpipe run` would reuse it; one that finished before models were logged gets its
model logged first."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from kdpipe.data import prepare_data
from kdpipe.data.evaluation import open_split
from kdpipe.driver.evaluation import Evaluation, evaluate
from kdpipe.driver.mlflow_records import publish_stage
from kdpipe.driver.report import finished_runs
from kdpipe.errors import UserError
from kdpipe.models.export import export
from kdpipe.plan import Plan
from kdpipe.plots import plot_confusion, plot_reliability
from kdpipe.tracking.logged_model import load_classifier, logged_model_uri
from kdpipe.tracking.store import Tracker


def stage_run(plan: Plan, tracker: Tracker, stage: str) -> str:
    """The run of `stage` (its first seed's, for a repeated stage) that a `kdpipe run` of the job would reuse."""
    named = plan.named(stage)
    if not named:
        raise UserError(f"STAGE: no stage '{stage}' in job '{plan.job.name}'; its stages are: {', '.join(plan.order)}")
    run = finished_runs(plan, tracker, tracker.experiment_id(plan.job.tracking.experiment))[named[0]]
    if run is None:
        raise UserError(
            f"STAGE: '{named[0]}' of job '{plan.job.name}' has not finished in {tracker.uri}; run 'kdpipe run' first"
        )
    return run.info.run_id


def stage_model(plan: Plan, tracker: Tracker, stage: str) -> tuple[str, str]:
    """The stage's run and its logged model's `models:/` URI."""
    run_id = stage_run(plan, tracker, stage)
    model_uri = logged_model_uri(tracker.uri, run_id)
    if model_uri is None:
        publish_stage(tracker, run_id, prepare_data(plan.job.data), None)
        model_uri = logged_model_uri(tracker.uri, run_id)
    return run_id, model_uri


def register_stage(plan: Plan, tracker: Tracker, stage: str, name: str, alias: str) -> tuple[str, int]:
    run_id = stage_run(plan, tracker, stage)
    return run_id, publish_stage(tracker, run_id, prepare_data(plan.job.data), name, alias)


def run_model(tracker: Tracker, run_id: str) -> str:
    """A run id given on the command line: its logged model."""
    model_uri = logged_model_uri(tracker.uri, run_id)
    if model_uri is None:
        raise UserError(f"{run_id}: no run with a logged model in {tracker.uri}")
    return model_uri


def export_model(tracker: Tracker, model_uri: str, fmt: str, out: Path) -> tuple[Path, float | None]:
    classifier = load_classifier(tracker.uri, model_uri)
    return export(classifier.network, classifier.config, fmt, out)


def evaluate_model(
    tracker: Tracker, run_id: str, model_uri: str, data: str, split: str, progress: Callable[..., None]
) -> tuple[Evaluation, str]:
    """The model on a split of `data`, logged into a run nested under the stage's: metrics, per-class accuracy,
    the confusion matrix and the reliability diagram."""
    found = open_split(data, split)
    classifier = load_classifier(tracker.uri, model_uri)
    result = evaluate(lambda images: classifier.probabilities(images).numpy(), classifier.classes, found, progress)
    eval_run = tracker.start_eval_run(run_id, data, split)
    tracker.log_metrics(eval_run, result.metrics(), step=0)
    title = f"{data} ({split})"
    with tempfile.TemporaryDirectory() as folder:
        pictures = [
            plot_confusion(result.confusion(), result.classes, title, Path(folder) / "confusion.png"),
            plot_reliability(result.reliability(), result.calibration_error(), title, Path(folder) / "reliability.png"),
        ]
        tracker.artifacts(eval_run).log_files(pictures, "eval")
    tracker.finish(eval_run)
    return result, eval_run
