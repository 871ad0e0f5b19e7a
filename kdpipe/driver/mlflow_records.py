"""`StageRecords` in an MLflow experiment: runs found by fingerprint, held through leases
(`kdpipe.tracking.lease`), final weights and checkpoints found by the worker's artifact layout
(`kdpipe.worker.artifacts`)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run

from kdpipe.data import PreparedData
from kdpipe.driver.publish import classifier_config, model_costs
from kdpipe.driver.records import Finished, Unfinished
from kdpipe.job.spec import DataSpec
from kdpipe.models import WEIGHTS_FILE
from kdpipe.tracking import lease
from kdpipe.tracking.lease import Lease, lease_seconds, run_is_live
from kdpipe.tracking.logged_model import ALIAS, log_classifier, logged_model_uri, register
from kdpipe.tracking.store import DataRef, Tracker
from kdpipe.tracking.tags import TAG_FINGERPRINT, TAG_JOB, TAG_STAGE, TAG_TEACHER, TAG_VALUES
from kdpipe.worker import artifacts


class MlflowRecords:
    """`StageRecords` in an MLflow experiment."""

    def __init__(self, tracker: Tracker, experiment_id: str, data: DataRef, prepared: PreparedData):
        self.tracker, self.experiment_id, self.uri, self.data = tracker, experiment_id, tracker.uri, data
        self.prepared = prepared
        self.job = self.parent = ""
        self.renewed = time.monotonic()

    def start_job(self, name: str, spec: dict, settings: Sequence[str]) -> None:
        self.job, self.parent = name, self.tracker.start_job_run(self.experiment_id, name, spec, settings)

    def finished(self, fingerprint: str) -> Finished | None:
        run = self.tracker.find_finished_stage(self.experiment_id, fingerprint, artifacts.FINAL_WEIGHTS)
        if run is None:
            return None
        values = run.data.tags.get(TAG_VALUES)
        return Finished(run.info.run_id, self.tracker.result_metrics(run), json.loads(values) if values else {})

    def unfinished(self, fingerprint: str) -> Unfinished | None:
        run = self.tracker.find_interrupted_stage(self.experiment_id, fingerprint)
        if run is None:
            return None
        run_id, holder = run.info.run_id, holder_of(run)
        if holder:
            return Unfinished(run_id, holder, False)
        return Unfinished(run_id, "", bool(artifacts.stored_checkpoints(self.tracker.artifacts(run_id))))

    def holder(self, run_id: str) -> str:
        return holder_of(self.tracker.get_run(run_id))

    def create(
        self, stage: str, fingerprint: str, config: dict, teacher_runs: dict[str, str], seed: int
    ) -> str | Unfinished:
        tracker = self.tracker
        run_id = tracker.start_stage_run(
            self.experiment_id, self.parent, self.job, stage, fingerprint, config, teacher_runs, seed, lease.held()
        )
        first = lease.first_live_run(tracker, self.experiment_id, fingerprint)
        if first is None or first.info.run_id == run_id:
            tracker.log_dataset(run_id, self.data)
            return run_id
        tracker.discard(run_id)
        return Unfinished(first.info.run_id, holder_of(first), False)

    def take_over(self, run_id: str, stage: str) -> bool:
        if not lease.take_over(self.tracker, run_id):
            return False
        self.tracker.reopen(run_id, self.parent, stage)
        return True

    def artifact_uri(self, run_id: str) -> str:
        return self.tracker.artifact_uri(run_id)

    def store_init(self, run_id: str, weights: Path) -> None:
        files = self.tracker.artifacts(run_id)
        if not files.holds(artifacts.INIT_WEIGHTS):
            files.log_files([weights], artifacts.INIT)

    def mark_reused(self, stage: str, run_id: str) -> None:
        self.tracker.set_tags(self.parent, {f"kdpipe.reused.{stage}": run_id})

    def end(self, run_id: str, ok: bool) -> dict[str, float]:
        self.tracker.finish(run_id, "FINISHED" if ok else "FAILED")
        return self.tracker.result_metrics(self.tracker.get_run(run_id))

    def publish(self, run_id: str, name: str | None) -> None:
        publish_stage(self.tracker, run_id, self.prepared, name)

    def renew(self, run_ids: list[str]) -> None:
        """A few times per lease."""
        if time.monotonic() - self.renewed < lease_seconds() / 3:
            return
        self.renewed = time.monotonic()
        lease.renew(self.tracker, run_ids)

    def release(self, run_id: str) -> None:
        lease.release(self.tracker, run_id)

    def end_job(self, title: str, results: list, baseline: str | None, drawn: bool, ok: bool) -> None:
        from kdpipe.driver.report import log_report

        log_report(self.tracker, self.parent, title, results, baseline, drawn)
        self.tracker.finish(self.parent, "FINISHED" if ok else "FAILED")


def publish_stage(
    tracker: Tracker, run_id: str, data: PreparedData, name: str | None, alias: str = ALIAS
) -> int | None:
    """A finished stage's weights as its run's MLflow Model (logged once, with its size and speed as metrics), and,
    with a `name`, a version of that registered model tagged with the stage's job, fingerprint, teachers and
    top-1; returns the version."""
    model_uri = logged_model_uri(tracker.uri, run_id)
    if model_uri is None:
        with tracker.artifacts(run_id).downloaded(artifacts.WEIGHTS) as folder:
            config, code, requirements = classifier_config(folder, data)
            model_uri = log_classifier(tracker.uri, run_id, folder / WEIGHTS_FILE, config, code, requirements)
            tracker.log_metrics(run_id, model_costs(folder, config["crop"]), step=0)
    if not name:
        return None
    run = tracker.get_run(run_id)
    run_tags, top1 = run.data.tags, tracker.result_metrics(run).get("val/top1")
    teachers = sorted(key.removeprefix(f"{TAG_TEACHER}.") for key in run_tags if key.startswith(f"{TAG_TEACHER}."))
    tags = {key: run_tags.get(key, "") for key in (TAG_JOB, TAG_STAGE, TAG_FINGERPRINT)}
    tags |= {"kdpipe.teachers": ",".join(teachers), "val/top1": "" if top1 is None else f"{top1:.4f}"}
    return register(tracker.uri, run_id, model_uri, name, tags, alias)


def holder_of(run: Run) -> str:
    """The living driver that trains a run, in words; "" when none does."""
    return Lease.of(run).describe() if run_is_live(run) else ""


def data_ref(spec: DataSpec, identity: str) -> DataRef:
    """The job's data as an MLflow dataset: named by its source and folder, digested by its content's identity."""
    where = spec.path or spec.source
    if "://" not in where and spec.path:
        where = str(Path(where).resolve())
    return DataRef(f"{spec.source}:{Path(where).name or where}", identity[:12], where)
