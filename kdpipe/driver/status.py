"""What MLflow knows about each stage of a job, for `kdpipe status`: found by the same fingerprints `kdpipe run`
uses, so a stage shown `done` is exactly one a rerun would reuse."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from kdpipe.driver.imports import import_digests, source_files
from kdpipe.driver.state import StageState
from kdpipe.plan import Plan
from kdpipe.tracking.lease import run_is_live
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_CHECKPOINT

RUN_STATES = {"FINISHED": StageState.DONE, "RUNNING": StageState.RUNNING}  # FAILED and KILLED runs: failed
TRIAL_STATES = {**RUN_STATES, "KILLED": StageState.PRUNED}  # a searched stage's trials, listed under it


@dataclass(frozen=True)
class StageStatus:
    name: str
    method: str
    state: StageState
    run_id: str = ""
    epochs: str = ""  # "done/planned"
    step: int = 0  # the global step of the stage's latest checkpoint
    best_top1: float | None = None
    seconds: float | None = None


def job_status(plan: Plan, tracker: Tracker, experiment_id: str) -> list[StageStatus]:
    prints = plan.current_fingerprints(import_digests(source_files(plan, fetch=False)))
    job_run = tracker.latest_job_run(experiment_id, plan.job.name)
    tags = job_run.data.tags if job_run else {}
    rows = []
    for name in plan.order:
        spec = plan.stages[name].spec
        run = tracker.latest_stage_run(experiment_id, prints[name]) if name in prints else None
        if run is None:
            older = tracker.latest_finished_stage_run(experiment_id, plan.job.name, name)
            # trained before, but something it learns from has changed since (or kdpipe's fingerprint rule has)
            rows.append(
                StageStatus(name, spec.method, StageState.OUTDATED if older else StageState.PENDING, older or "")
            )
            continue
        state = RUN_STATES.get(run.info.status, StageState.FAILED)
        if state == StageState.DONE and tags.get(f"kdpipe.reused.{name}") == run.info.run_id:
            state = StageState.REUSED  # the latest `kdpipe run` of this job took it from an earlier one
        if state == StageState.RUNNING and not run_is_live(run):
            state = StageState.INTERRUPTED  # its driver is gone: the next `kdpipe run` resumes it
        if spec.search is None:
            rows.append(row_of(tracker, name, spec.method, state, run, spec.epochs))
            continue
        trials = tracker.trial_runs(experiment_id, run.info.run_id)
        stage_row = row_of(tracker, name, spec.method, state, run, spec.epochs)
        rows.append(dataclasses.replace(stage_row, epochs=f"{len(trials)}/{spec.search.trials} trials"))
        for trial in trials:
            trial_state = TRIAL_STATES.get(trial.info.status, StageState.FAILED)
            if trial_state == StageState.RUNNING and state != StageState.RUNNING:
                trial_state = StageState.INTERRUPTED
            rows.append(row_of(tracker, f"└ {trial.info.run_name}", "", trial_state, trial, spec.epochs))
    return rows


def row_of(tracker: Tracker, name: str, method: str, state: StageState, run, epochs: int) -> StageStatus:
    history = tracker.metric_history(run.info.run_id, ["val/top1"])["val/top1"]
    checkpoint = run.data.tags.get(TAG_CHECKPOINT, "step-0")
    ended = run.info.end_time or time.time() * 1000
    return StageStatus(
        name,
        method,
        state,
        run.info.run_id,
        f"{len({step for step, _ in history})}/{epochs}" if epochs else "import",  # a redone epoch counts once
        int(checkpoint.split("-")[-1]),
        max((value for _, value in history), default=None),
        (ended - run.info.start_time) / 1000,
    )
