"""The MLflow store, as kdpipe uses it: a job run per `kdpipe run`, a nested run per stage and per search trial,
params, per-epoch metrics and tags, and the queries behind reuse and resume. The rules live here, in one place;
leases are `kdpipe.tracking.lease`'s, files `kdpipe.tracking.files`'s, and what a stage's artifacts are is the
worker's business (`kdpipe.worker.artifacts`).

Runs are addressed through an explicit `MlflowClient`, never MLflow's global "active run", so the driver and every
Ray worker can log to the same run at once.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

from kdpipe.errors import UserError
from kdpipe.tracking import TrackingError
from kdpipe.tracking.files import RunArtifacts
from kdpipe.tracking.tags import (
    EXPERIMENT_KIND,
    MODEL_TRAINING,
    TAG_FINGERPRINT,
    TAG_JOB,
    TAG_KIND,
    TAG_SEED,
    TAG_SETTINGS,
    TAG_STAGE,
    TAG_TEACHER,
    TAG_TRIAL,
    TAG_VALUES,
)
from kdpipe.tracking.uri import Guarded, resolve_uri


@contextlib.contextmanager
def store_creation_lock(uri: str) -> Iterator[None]:
    """Processes opening one new sqlite store at once would each run MLflow's schema migrations on it, and all but
    one fail; a file lock beside the database lets one create it while the others wait."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class DataRef:
    """A job's data, as MLflow records a dataset: its name, a digest of its content, and where it is read from."""

    name: str
    digest: str
    source: str


class Tracker:
    def __init__(self, uri: str):
        self.uri = resolve_uri(uri)
        with store_creation_lock(self.uri):
            self.client = Guarded(MlflowClient(self.uri), self.uri)

    def experiment_id(self, name: str) -> str:
        """Get or create the experiment, marked as model training; a sqlite store keeps artifacts beside its
        database file."""
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                if found.tags.get(EXPERIMENT_KIND) is None:  # made before kdpipe marked its experiments
                    self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
                return found.experiment_id
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            return self.client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING}
            )
        except TrackingError as err:
            raise UserError(f"tracking.uri: cannot use the MLflow store: {err}") from None

    def start_job_run(self, experiment_id: str, job: str, spec: dict, settings: Sequence[str] = ()) -> str:
        """The job run: the resolved job as `job.json`, and the `--set` settings it was run with as a tag."""
        tags = {TAG_KIND: "job", TAG_JOB: job, MLFLOW_RUN_NAME: job}
        if settings:
            tags[TAG_SETTINGS] = json.dumps(list(settings))
        run = self.client.create_run(experiment_id, tags=tags, run_name=job)
        self.client.log_text(run.info.run_id, json.dumps(spec, indent=1), "job.json")
        return run.info.run_id

    def start_stage_run(
        self,
        experiment_id: str,
        parent_id: str,
        job: str,
        stage: str,
        fingerprint: str,
        config: dict,
        teacher_runs: dict[str, str],
        seed: int = 0,
        lease: dict[str, str] | None = None,
    ) -> str:
        """A stage run, created held (`lease`: `kdpipe.tracking.lease.held()`) so that no other driver trains it
        while this one lives, and described (MLflow's run description) by its method, model and teachers."""
        teachers = ", ".join(teacher_runs) or "the labels alone"
        tags = {f"{TAG_TEACHER}.{name}": run for name, run in teacher_runs.items()}
        tags |= {
            MLFLOW_RUN_NOTE: f"{config['model']} trained by {config['method']} from {teachers}: stage {stage} of "
            f"kdpipe job {job}",
            TAG_KIND: "stage",
            TAG_JOB: job,
            TAG_STAGE: stage,
            TAG_SEED: str(seed),
            TAG_FINGERPRINT: fingerprint,
            MLFLOW_PARENT_RUN_ID: parent_id,
            MLFLOW_RUN_NAME: stage,
            **(lease or {}),
        }
        return self._create_run(experiment_id, tags, config).info.run_id

    def start_trial_run(
        self, experiment_id: str, stage_run: str, job: str, stage: str, trial: str, values: dict, config: dict
    ) -> Run:
        """A trial of a searched stage, nested under the stage's run; never a stage result (no fingerprint)."""
        tags = {
            TAG_KIND: "trial",
            TAG_JOB: job,
            TAG_STAGE: stage,
            TAG_TRIAL: trial,
            TAG_VALUES: json.dumps(values),
            MLFLOW_PARENT_RUN_ID: stage_run,
            MLFLOW_RUN_NAME: f"{stage} trial {trial.rsplit('_', 1)[-1]}",
        }
        return self._create_run(experiment_id, tags, config)

    def start_eval_run(self, stage_run: str, data: str, split: str) -> str:
        """A `kdpipe eval` of a stage's model, nested under the stage's run."""
        stage = self.get_run(stage_run)
        tags = {
            TAG_KIND: "eval",
            TAG_JOB: stage.data.tags.get(TAG_JOB, ""),
            TAG_STAGE: stage.data.tags.get(TAG_STAGE, ""),
            MLFLOW_PARENT_RUN_ID: stage_run,
            MLFLOW_RUN_NAME: f"{stage.data.tags.get(TAG_STAGE, 'stage')} eval on {data} ({split})",
        }
        return self._create_run(stage.info.experiment_id, tags, {"data": data, "split": split}).info.run_id

    def _create_run(self, experiment_id: str, tags: dict[str, str], config: dict) -> Run:
        """A new run with these tags (its name among them) and the stage's config, flattened, as its params."""
        run = self.client.create_run(experiment_id, tags=tags, run_name=tags[MLFLOW_RUN_NAME])
        params = [Param(key, str(value)) for key, value in flatten(config).items()]
        self.client.log_batch(run.info.run_id, params=params)
        return run

    def log_dataset(self, run_id: str, data: DataRef) -> None:
        """The data a run trains on, as its MLflow dataset input (the UI's Dataset column and lineage)."""
        source_type = data.source.split("://", 1)[0] if "://" in data.source else "local"
        dataset = Dataset(data.name, data.digest, source_type, json.dumps({"uri": data.source}))
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "train")])])

    def trial_runs(self, experiment_id: str, stage_run: str, trial: str | None = None) -> list[Run]:
        """A searched stage's trial runs (of one Tune trial id, if given), oldest first."""
        which = f"tags.`{TAG_KIND}` = 'trial' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{stage_run}'"
        if trial is not None:
            which += f" and tags.`{TAG_TRIAL}` = '{trial}'"
        return self.client.search_runs([experiment_id], which, order_by=["attributes.start_time ASC"])

    def find_finished_stage(self, experiment_id: str, fingerprint: str, result: str) -> Run | None:
        """The newest FINISHED stage run with this fingerprint that holds the artifact `result` (its final weights).

        This is the reuse rule: a fingerprint names everything a stage learns from, so such a run is exactly what
        training the stage again would produce (up to nondeterminism).
        """
        runs = self.client.search_runs(
            [experiment_id],
            f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        for run in runs:
            if RunArtifacts(run.info.artifact_uri, self.uri).holds(result):
                return run
        return None

    def find_interrupted_stage(self, experiment_id: str, fingerprint: str) -> Run | None:
        """The newest run of this fingerprint that never finished (its driver or workers died, or it failed), or
        one another driver is training (see `kdpipe.tracking.lease`)."""
        unfinished = f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and attributes.status != 'FINISHED'"
        return self._newest(experiment_id, unfinished)

    def search_runs(self, experiment_id: str, which: str) -> list[Run]:
        return self.client.search_runs([experiment_id], which)

    def get_run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def artifact_uri(self, run_id: str) -> str:
        return self.get_run(run_id).info.artifact_uri

    def artifacts(self, run_id: str) -> RunArtifacts:
        return RunArtifacts(self.artifact_uri(run_id), self.uri)

    def discard(self, run_id: str) -> None:
        """A run created at the same moment as another driver's run of the same stage, which trains instead."""
        self.client.delete_run(run_id)

    def latest_stage_run(self, experiment_id: str, fingerprint: str) -> Run | None:
        return self._newest(experiment_id, f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}'")

    def latest_finished_stage_run(self, experiment_id: str, job: str, stage: str) -> str | None:
        """The newest FINISHED run of a job's stage, whatever its fingerprint."""
        which = f"tags.`{TAG_JOB}` = '{job}' and tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'FINISHED'"
        run = self._newest(experiment_id, which)
        return run.info.run_id if run else None

    def latest_job_run(self, experiment_id: str, job: str) -> Run | None:
        return self._newest(experiment_id, f"tags.`{TAG_KIND}` = 'job' and tags.`{TAG_JOB}` = '{job}'")

    def _newest(self, experiment_id: str, which: str) -> Run | None:
        runs = self.client.search_runs([experiment_id], which, order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def reopen(self, run_id: str, parent_id: str, stage: str) -> None:
        """Mark an interrupted stage run RUNNING again: it resumes in place, keeping its run id and history."""
        self.mark_running(run_id)
        self.set_tags(parent_id, {f"kdpipe.resumed.{stage}": run_id})

    def mark_running(self, run_id: str) -> None:
        """A run that goes on where it stopped (an interrupted search trial)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def read_text(self, run_id: str, path: str) -> str:
        """An artifact file of a run, as text."""
        with self.artifacts(run_id).downloaded(str(Path(path).parent), [Path(path).name]) as folder:
            return (folder / Path(path).name).read_text()

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    def result_metrics(self, run: Run) -> dict[str, float]:
        """A stage run's metrics as its final weights have them: the last epoch's, or with `result: best` (the
        metric `best_epoch`) the held-out ones of that epoch."""
        metrics = dict(run.data.metrics)
        if "best_epoch" not in metrics:
            return metrics
        held_out = [key for key in metrics if key.startswith("val/")]
        for key, history in self.metric_history(run.info.run_id, held_out).items():
            metrics[key] = next(value for step, value in history if step == int(metrics["best_epoch"]))
        return metrics

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, run_id: str, params: dict[str, object]) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metric_history(self, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Every logged (step, value) of each metric: the epochs of an interrupted and resumed run included."""
        return {key: [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)] for key in keys}

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config as MLflow params: `optimizer.lr`, `params.temperature`, ..."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
