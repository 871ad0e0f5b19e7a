"""What MLflow knows about each stage of a job, for `kdpipe status`: found by the same fingerprints `kdpipe run`
uses, so a stage shown `done` is exactly one a rerun would reuse."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from pipeline.plan import Plan
from pipeline.tracking import TAG_CHECKPOINT, Tracker, run_is_live

RUN_STATES = {"FINISHED": "done", "RUNNING": "running"}  # FAILED and KILLED runs show as failed
TRIAL_STATES = {**RUN_STATES, "KILLED": "pruned"}  # a searched stage's trials, listed under it


@dataclass(frozen=True)
class StageStatus:
    name: str
    method: str
    state: str  # pending | outdated | running | interrupted | done | reused | failed; a trial's also pruned
    run_id: str = ""
    epochs: str = ""  # "done/planned"
    step: int = 0  # the global step of the stage's latest checkpoint
    best_top1: float | None = None
    seconds: float | None = None


def job_status(plan: Plan, tracker: Tracker, experiment_id: str) -> list[StageStatus]:
    prints = plan.current_fingerprints()
    job_run = tracker.latest_job_run(experiment_id, plan.job.name)
    tags = job_run.data.tags if job_run else {}
    rows = []
    for name in plan.order:
        spec = plan.stages[name].spec
        run = tracker.latest_stage_run(experiment_id, prints[name]) if prints else None
        if run is None:
            older = tracker.latest_finished_stage_run(experiment_id, plan.job.name, name)
            # trained before, but something it learns from has changed since (or kdpipe's fingerprint rule has)
            rows.append(StageStatus(name, spec.method, "outdated" if older else "pending", older or ""))
            continue
        state = RUN_STATES.get(run.info.status, "failed")
        if state == "done" and tags.get(f"kdpipe.reused.{name}") == run.info.run_id:
            state = "reused"  # the latest `kdpipe run` of this job took it from an earlier one
        if state == "running" and not run_is_live(run):
            state = "interrupted"  # its driver is gone: the next `kdpipe run` resumes it
        if spec.search is None:
            rows.append(row_of(tracker, name, spec.method, state, run, spec.epochs))
            continue
        trials = tracker.trial_runs(experiment_id, run.info.run_id)
        stage_row = row_of(tracker, name, spec.method, state, run, spec.epochs)
        rows.append(dataclasses.replace(stage_row, epochs=f"{len(trials)}/{spec.search.trials} trials"))
        for trial in trials:
            trial_state = TRIAL_STATES.get(trial.info.status, "failed")
            if trial_state == "running" and state != "running":
                trial_state = "interrupted"
            rows.append(row_of(tracker, f"└ {trial.info.run_name}", "", trial_state, trial, spec.epochs))
    return rows


def row_of(tracker: Tracker, name: str, method: str, state: str, run, epochs: int) -> StageStatus:
    history = tracker.client.get_metric_history(run.info.run_id, "val/top1")
    checkpoint = run.data.tags.get(TAG_CHECKPOINT, "step-0")
    ended = run.info.end_time or time.time() * 1000
    return StageStatus(
        name,
        method,
        state,
        run.info.run_id,
        f"{len({m.step for m in history})}/{epochs}",  # an epoch redone after a restart counts once
        int(checkpoint.split("-")[-1]),
        max((m.value for m in history), default=None),
        (ended - run.info.start_time) / 1000,
    )
