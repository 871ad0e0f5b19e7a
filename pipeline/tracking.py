"""Every MLflow call kdpipe makes: a parent run per pipeline run, a nested run per stage, params, per-epoch
metrics, fingerprint tags, and artifacts moved as files and folders. The reuse and resume rules live here, in one
place; what the artifacts are is `pipeline.artifacts`'s business, not this module's.

Runs are addressed through an explicit `MlflowClient`, never MLflow's global "active run", so the driver and every
Ray worker can log to the same run at once. A run's files move through `RunArtifacts`, which needs the run's
artifact URI alone: of a stage's ranks, only rank 0 logs metrics and tags (`pipeline.tracking_actor`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline.errors import UserError

TAG_KIND, TAG_JOB, TAG_STAGE, TAG_FINGERPRINT = "kdpipe.kind", "kdpipe.job", "kdpipe.stage", "kdpipe.fingerprint"
TAG_TEACHER = "kdpipe.teacher"  # kdpipe.teacher.<stage> = the MLflow run whose weights this stage learned from
TAG_CHECKPOINT, TAG_RESUMED = "kdpipe.checkpoint", "kdpipe.resumed_from"
TAG_SEED = "kdpipe.seed"  # on a stage run: the seed it trained with (one repeat of `seeds:`)
TAG_SETTINGS = "kdpipe.set"  # on a job run: the `--set PATH=VALUE` settings of the command line, a JSON list
TAG_NODE = "kdpipe.node"  # kdpipe.node.<rank> = the Ray node id that rank of the stage ran on
# A searched stage's trials are runs nested under its run: kind "trial", the Ray Tune trial id, the sampled values
# (on the stage run: its best trial's).
TAG_TRIAL, TAG_VALUES, TAG_PRUNED = "kdpipe.trial", "kdpipe.trial.values", "kdpipe.pruned"
TAG_BEST_TRIAL = "kdpipe.search.best_trial"  # on the stage run: the trial whose weights are the stage's result
TAG_HOLDER, TAG_HEARTBEAT = "kdpipe.lease.holder", "kdpipe.lease.heartbeat"  # the driver training a run, and when
# it last said so (seconds since the epoch). A lease older than KDPIPE_LEASE_SECONDS is stale: its driver is gone.
DEFAULT_LEASE_SECONDS = 180.0
LEASE_SETTLE_SECONDS = 1.0  # a driver taking over a stale run reads the lease back after this long: last writer wins
# This process, as a lease names it: host, pid and a random part (pids are reused).
DRIVER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

# kdpipe prints its own table of run ids; MLflow's per-run "View run at" lines and download bars would break into
# the progress bars.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def lease_seconds() -> float:
    return float(os.environ.get("KDPIPE_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


@dataclass(frozen=True)
class Lease:
    """Who trains a run: the driver and its last heartbeat."""

    holder: str
    heartbeat: float

    @classmethod
    def of(cls, run: Run) -> Lease:
        tags = run.data.tags
        try:
            heartbeat = float(tags.get(TAG_HEARTBEAT, "0"))
        except ValueError:
            heartbeat = 0.0
        return cls(tags.get(TAG_HOLDER, ""), heartbeat)

    @property
    def live(self) -> bool:
        """Renewed within the lease time, by a driver that (if it ran on this host) still exists."""
        if not self.holder or time.time() - self.heartbeat > lease_seconds():
            return False
        host, pid, _ = (self.holder.split(":") + ["", "", ""])[:3]
        if host == socket.gethostname() and pid.isdigit() and pid != str(os.getpid()):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return True

    def describe(self) -> str:
        host, pid, _ = (self.holder.split(":") + ["", "", ""])[:3]
        since = time.strftime("%H:%M:%S", time.localtime(self.heartbeat))
        return f"by the kdpipe driver pid {pid} on {host} (heartbeat {since})"


def run_is_live(run: Run) -> bool:
    """An unfinished run that a living driver holds."""
    return run.info.status == "RUNNING" and Lease.of(run).live


class TrackingError(Exception):
    """MLflow failed (server unreachable, store broken): one line that names the tracking URI."""


@contextlib.contextmanager
def naming_uri(uri: str):
    """Turn any MLflow, HTTP or file-store failure inside the block into a one-line `TrackingError`."""
    try:
        yield
    except (mlflow.exceptions.MlflowException, requests.RequestException, OSError) as err:
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TrackingError(f"MLflow tracking at {uri} failed: {reason[:300]}") from None


class Guarded:
    """An MLflow client or artifact repository whose every failing call raises a `TrackingError` naming the
    tracking URI."""

    def __init__(self, target, uri: str):
        self.uri, self._target = uri, target

    def __getattr__(self, name: str):
        method = getattr(self._target, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            with naming_uri(self.uri):
                return method(*args, **kwargs)

        return call


class RunArtifacts:
    """One run's artifact files, reached through its artifact URI alone. Moving files needs no tracking store, so a
    Ray worker that only uploads its part of a checkpoint or downloads a teacher never opens the SQL store (a
    second of imports and mapper set-up in every process) nor asks the server for the run."""

    def __init__(self, artifact_uri: str, tracking_uri: str):
        uri = resolve_uri(tracking_uri)
        with naming_uri(uri):  # an `mlflow-artifacts:` location is resolved against the tracking server
            self.repository = Guarded(get_artifact_repository(artifact_uri, tracking_uri=uri), uri)

    def holds(self, path: str) -> bool:
        """Whether the run has the artifact file `path`."""
        folder = str(Path(path).parent)
        return path in {a.path for a in self.repository.list_artifacts(None if folder == "." else folder)}

    def folders_holding(self, parent: str, file: str) -> list[str]:
        """Names of the folders under `parent` that hold a file named `file`."""
        return [
            Path(folder.path).name
            for folder in self.repository.list_artifacts(parent)
            if folder.is_dir and self.holds(f"{folder.path}/{file}")
        ]

    def list_folder(self, folder: str) -> list[str]:
        """Names of the entries of an artifact folder."""
        return [Path(a.path).name for a in self.repository.list_artifacts(folder)]

    def log_files(self, files: list[Path], folder: str) -> None:
        for path in files:
            self.repository.log_artifact(str(path), folder)

    def log_folder(self, local: Path, folder: str) -> None:
        self.repository.log_artifacts(str(local), folder)

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            self.repository.delete_artifacts(path)

    @contextlib.contextmanager
    def downloaded(self, folder: str, names: Sequence[str] = ()) -> Iterator[Path]:
        """An artifact folder, or only its files `names`, downloaded to a local folder removed after the block."""
        with tempfile.TemporaryDirectory(prefix="kdpipe-artifacts-") as target:
            for path in [f"{folder}/{name}" for name in names] or [folder]:
                self.repository.download_artifacts(path, target)  # to target/<path>
            yield Path(target) / folder


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute, so Ray workers (whose working folder differs) find the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


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


class Tracker:
    def __init__(self, uri: str):
        self.uri = resolve_uri(uri)
        with store_creation_lock(self.uri):
            self.client = Guarded(MlflowClient(self.uri), self.uri)

    def experiment_id(self, name: str) -> str:
        """Get or create the experiment; a sqlite store keeps artifacts beside its database file."""
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            return self.client.create_experiment(name, artifact_location=location)
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
    ) -> str:
        tags = {f"{TAG_TEACHER}.{name}": run for name, run in teacher_runs.items()}
        tags |= {
            TAG_KIND: "stage",
            TAG_JOB: job,
            TAG_STAGE: stage,
            TAG_SEED: str(seed),
            TAG_FINGERPRINT: fingerprint,
            MLFLOW_PARENT_RUN_ID: parent_id,
            MLFLOW_RUN_NAME: stage,
            TAG_HOLDER: DRIVER,  # created held: another driver never trains it while this one lives
            TAG_HEARTBEAT: str(time.time()),
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

    def _create_run(self, experiment_id: str, tags: dict[str, str], config: dict) -> Run:
        """A new run with these tags (its name among them) and the stage's config, flattened, as its params."""
        run = self.client.create_run(experiment_id, tags=tags, run_name=tags[MLFLOW_RUN_NAME])
        params = [Param(key, str(value)) for key, value in flatten(config).items()]
        self.client.log_batch(run.info.run_id, params=params)
        return run

    def trial_runs(self, experiment_id: str, stage_run: str, trial: str | None = None) -> list[Run]:
        """A searched stage's trial runs (of one Tune trial id, if given), oldest first."""
        which = f"tags.`{TAG_KIND}` = 'trial' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{stage_run}'"
        if trial is not None:
            which += f" and tags.`{TAG_TRIAL}` = '{trial}'"
        return self.client.search_runs([experiment_id], which, order_by=["attributes.start_time ASC"])

    def find_finished_stage(
        self, experiment_id: str, fingerprint: str, result: str
    ) -> tuple[str, dict[str, float]] | None:
        """The newest FINISHED stage run with this fingerprint that holds the artifact `result` (its final weights),
        and its last metrics.

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
                return run.info.run_id, dict(run.data.metrics)
        return None

    def find_interrupted_stage(self, experiment_id: str, fingerprint: str) -> Run | None:
        """The newest run of this fingerprint that never finished (its driver or workers died, or it failed), or
        one another driver is training (see `Lease`)."""
        unfinished = f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and attributes.status != 'FINISHED'"
        return self._newest(experiment_id, unfinished)

    def first_live_run(self, experiment_id: str, fingerprint: str) -> Run | None:
        """Of the runs of this fingerprint that living drivers hold, the first created: drivers that created runs
        of one stage at the same moment all agree that this one trains it."""
        running = f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and attributes.status = 'RUNNING'"
        runs = [run for run in self.client.search_runs([experiment_id], running) if run_is_live(run)]
        return min(runs, key=lambda run: (run.info.start_time, run.info.run_id), default=None)

    def take_over(self, run_id: str) -> bool:
        """Hold a run whose driver is gone; False if another driver took it at the same moment (the lease is
        written, left to settle, and read back: the last writer holds it)."""
        self.renew([run_id])
        time.sleep(LEASE_SETTLE_SECONDS)
        return Lease.of(self.client.get_run(run_id)).holder == DRIVER

    def renew(self, run_ids: list[str]) -> None:
        """The heartbeat of runs this driver trains."""
        for run_id in run_ids:
            self.set_tags(run_id, {TAG_HOLDER: DRIVER, TAG_HEARTBEAT: str(time.time())})

    def release(self, run_id: str) -> None:
        """Give up a run this driver was training (it stops): the next driver may resume it at once."""
        self.set_tags(run_id, {TAG_HEARTBEAT: "0"})

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
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(parent_id, {f"kdpipe.resumed.{stage}": run_id})

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

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
