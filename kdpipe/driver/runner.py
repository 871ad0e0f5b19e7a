"""Running a planned job: for each stage, reuse, wait, resume or train, teachers before students.

A stage is handed to the launcher as soon as its teachers are done, each on its own driver thread; the launcher
starts it when the cluster has room (`kdpipe.driver.launcher`). The decisions are here; the
record of runs (`kdpipe.driver.records`) and the launching are arguments, so the state machine is tested without
Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kdpipe.data import PreparedData, prepare_data, steps_per_epoch
from kdpipe.driver.imports import InitFile
from kdpipe.driver.records import StageRecords, Unfinished
from kdpipe.driver.report import job_results
from kdpipe.driver.state import StageState
from kdpipe.driver.watchdog import Watchdog
from kdpipe.errors import one_line
from kdpipe.job.cache_policy import cache_settings
from kdpipe.plan import Plan, PlannedStage
from kdpipe.tracking import TrackingError
from kdpipe.worker.task import InitRef, StageTask, TeacherRef

POLL_SECONDS = 2.0  # how often the driver looks at stages and progress: every poll takes CPU from training


@dataclass
class StageOutcome:
    name: str
    method: str
    teachers: list[str]
    status: StageState = StageState.PENDING
    run_id: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    error: str = ""
    resumed: bool = False  # an interrupted run of this stage is continued in place
    chosen: dict = field(default_factory=dict)  # a searched stage: the values its best trial had

    @property
    def finished(self) -> bool:
        return self.status.finished


class Launcher(Protocol):
    """What trains a stage: `kdpipe.driver.launch.RayLauncher`, or a test's."""

    def resumable(self, stage: str, run_id: str) -> bool:
        """Whether the launcher's own storage holds checkpoints of this stage run."""

    def prepare(self) -> None:
        """Called on the driver's thread before a launch."""

    def launch(self, task: StageTask, stage: PlannedStage) -> dict[str, Any]:
        """Train the stage (on a pool thread); returns a search's chosen values; raises if it failed."""

    def progress(self) -> dict[str, dict]:
        """What the running stages last reported, by stage name."""

    def close(self) -> None: ...


Poll = Callable[[dict[str, StageOutcome], dict], None]
Stall = Callable[[str], None]


def run_job(
    plan: Plan,
    *,
    force: tuple[str, ...] = (),
    verbose: bool = False,
    on_poll: Poll | None = None,
    on_stall: Stall | None = None,
    on_note: Stall | None = None,
) -> dict[str, StageOutcome]:
    """Run every stage that has not run with these exact inputs, on Ray; `force` retrains the named stages and
    everything downstream of them in new MLflow runs (the old runs and their artifacts stay). Imported weights are
    fetched and fitted first (`on_note` hears of a head that starts fresh). Ray starts only once a stage has to
    train."""
    from kdpipe.driver.imports import fit_imports, import_digests, source_files
    from kdpipe.driver.launcher import RayLauncher
    from kdpipe.driver.mlflow_records import MlflowRecords, data_ref
    from kdpipe.tracking.store import Tracker

    data, tracker = prepare_data(plan.job.data), Tracker(plan.job.tracking.uri)
    with tempfile.TemporaryDirectory(prefix="kdpipe-init-") as folder:
        inits, notes = {}, {}
        files = source_files(plan)
        for name, init, note in fit_imports(plan, files, data.num_classes, Path(folder)):
            inits[name], notes[note] = init, None
        for note in filter(None, notes):
            if on_note:
                on_note(note)
        experiment = tracker.experiment_id(plan.job.tracking.experiment)
        launcher = RayLauncher(plan.job, tracker.uri, experiment, verbose)
        records = MlflowRecords(tracker, experiment, data_ref(plan.job.data, data.identity), data)
        runner = JobRunner(plan, data, records, launcher, import_digests(files), inits)
        try:
            return runner.run(force, on_poll, on_stall)
        finally:
            runner.release()


class JobRunner:
    """One `kdpipe run` of a job: which stages to reuse, resume, wait for or train, and when to launch them."""

    def __init__(
        self,
        plan: Plan,
        data: PreparedData,
        records: StageRecords,
        launcher: Launcher,
        digests: Mapping[str, str] | None = None,
        inits: Mapping[str, InitFile] | None = None,
    ):
        """`digests`: each imported source's content digest; `inits`: each importing stage's fitted weights
        (`kdpipe.driver.imports`)."""
        self.plan, self.job, self.data, self.records, self.launcher = plan, plan.job, data, records, launcher
        self.inits = inits or {}
        self.prints = plan.fingerprints(data.identity, digests)
        records.start_job(self.job.name, self.job.model_dump(), plan.settings)
        self.outcomes = {
            name: StageOutcome(name, spec.method, spec.teachers, fingerprint=self.prints[name])
            for name, spec in ((name, plan.stages[name].spec) for name in plan.order)
        }
        self.running: dict[Future, str] = {}

    def run(
        self, force: tuple[str, ...] = (), on_poll: Poll | None = None, on_stall: Stall | None = None
    ) -> dict[str, StageOutcome]:
        forced = set().union(*(self.plan.downstream(n) for name in force for n in self.plan.named(name)))
        for name in self.plan.order:
            if name not in forced:
                self.look_up(self.outcomes[name])
        # Stages that more stages wait on go first: a teacher before an independent baseline.
        launch_order = sorted(self.plan.order, key=lambda n: -len(self.plan.downstream(n)))
        watchdog = Watchdog(self.job.stall_minutes)
        with ThreadPoolExecutor(max_workers=len(self.plan.order)) as pool:
            while not all(o.status.ended for o in self.outcomes.values()):
                for name in launch_order:
                    self.advance(self.outcomes[name], pool)
                # With nothing running (every stage left waits on another driver), `wait([])` would return at
                # once: sleep instead of spinning a core against the stages the other driver trains.
                if self.running:
                    done, _ = wait(list(self.running), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                else:
                    done = set()
                    time.sleep(POLL_SECONDS)
                for future in done:
                    self.finish(future)
                with contextlib.suppress(TrackingError):  # an outage fails the stage itself; a missed beat is not fatal
                    self.records.renew([self.outcomes[name].run_id for name in self.running.values()])
                reported = self.launcher.progress()
                if on_poll:
                    on_poll(self.outcomes, reported)
                stalled = watchdog.look({name: o.status for name, o in self.outcomes.items()}, reported)
                if stalled and on_stall:
                    on_stall(stalled)
        self.end_job()
        return self.outcomes

    def end_job(self) -> None:
        """The job's report into its job run, which ends FINISHED if every stage did."""
        results = job_results(self.plan, {name: o.metrics if o.finished else None for name, o in self.outcomes.items()})
        # The report's plot only when this run trained something: a rerun that reused every stage draws the same
        # picture, and matplotlib's import would be most of its few seconds.
        drawn = any(o.status not in (StageState.REUSED, StageState.SKIPPED) for o in self.outcomes.values())
        ok = all(o.finished for o in self.outcomes.values())
        with contextlib.suppress(TrackingError):  # a tracking outage is already each stage's reported error
            self.records.end_job(f"kdpipe job '{self.job.name}'", results, self.job.baseline, drawn, ok)

    def look_up(self, outcome: StageOutcome) -> None:
        """Reuse a finished run of this exact stage (same fingerprint); wait for one another driver is training;
        resume an interrupted one that left a checkpoint (in MLflow, or in the launcher's storage); otherwise the
        stage trains from scratch."""
        found = self.records.finished(outcome.fingerprint)
        if found:
            outcome.status, outcome.run_id, outcome.metrics = StageState.REUSED, found.run_id, found.metrics
            outcome.chosen = found.chosen
            self.records.mark_reused(outcome.name, found.run_id)
            if self.plan.stages[outcome.name].spec.register:  # registered now if it was not when it ran
                self.records.publish(found.run_id, self.plan.stages[outcome.name].spec.register)
            return
        unfinished = self.records.unfinished(outcome.fingerprint)
        if unfinished is None:
            return
        if unfinished.holder:
            self.wait_for(outcome, unfinished)
        elif unfinished.checkpointed or self.launcher.resumable(outcome.name, unfinished.run_id):
            outcome.run_id, outcome.resumed = unfinished.run_id, True

    def wait_for(self, outcome: StageOutcome, run: Unfinished) -> None:
        outcome.status, outcome.run_id = StageState.WAITING, run.run_id
        outcome.error = f"run {run.run_id} is being trained {run.holder}"

    def advance(self, outcome: StageOutcome, pool: ThreadPoolExecutor) -> None:
        """Move a stage on if it can: skip it, see whether the run it waits for ended, or start it."""
        if outcome.status == StageState.WAITING:
            self.check_waiting(outcome)
        if outcome.status != StageState.PENDING:
            return
        teachers = [self.outcomes[t].status for t in outcome.teachers]
        if any(s in (StageState.FAILED, StageState.SKIPPED) for s in teachers):
            outcome.status, outcome.error = StageState.SKIPPED, "a teacher stage did not finish"
        elif all(s.finished for s in teachers):
            self.start(outcome, pool)

    def check_waiting(self, outcome: StageOutcome) -> None:
        """A run another driver holds: reuse it once it finished; look again once its driver is gone."""
        try:
            if self.records.holder(outcome.run_id):
                return
        except TrackingError:
            return
        outcome.status, outcome.run_id, outcome.error = StageState.PENDING, "", ""
        self.look_up(outcome)

    def start(self, outcome: StageOutcome, pool: ThreadPoolExecutor) -> None:
        job, records, stage = self.job, self.records, self.plan.stages[outcome.name]
        workers = stage.spec.workers.count
        if steps_per_epoch(self.data, job.data.batch_size, workers) == 0:
            outcome.status = StageState.FAILED
            outcome.error = (
                f"data: the training split gives no full batch of {job.data.batch_size} per worker with "
                f"{workers} workers; lower data.batch_size or the stage's workers.count"
            )
            return
        teacher_runs = {t: self.outcomes[t].run_id for t in stage.spec.teachers}
        try:
            if not self.claim(outcome, stage.config, teacher_runs):
                return
            teachers = tuple(TeacherRef(t, run, records.artifact_uri(run)) for t, run in teacher_runs.items())
            artifact_uri = records.artifact_uri(outcome.run_id)
            init = self.inits.get(outcome.name)
            if init is not None:
                records.store_init(outcome.run_id, init.path)
        except TrackingError as err:
            outcome.status, outcome.error = StageState.FAILED, str(err)
            return
        self.launcher.prepare()
        task = StageTask(
            job=job.name,
            stage=stage.spec,
            params=stage.params,
            data=self.data,
            reading=job.data,
            teachers=teachers,
            tracking_uri=records.uri,
            run_id=outcome.run_id,
            artifact_uri=artifact_uri,
            seed=stage.seed,
            checkpoint=job.checkpoint,
            cache=cache_settings(stage.teacher_cache(job), job.workdir),
            init=InitRef(artifact_uri, init.fresh, init.wanted) if init else None,
        )
        outcome.status, outcome.seconds = StageState.RUNNING, time.perf_counter()
        self.running[pool.submit(self.train, task, stage)] = outcome.name

    def train(self, task: StageTask, stage: PlannedStage) -> dict[str, Any]:
        """Launch the stage and wait for it (on a pool thread); then its model is published before it counts as
        finished."""
        chosen = self.launcher.launch(task, stage)
        self.records.publish(task.run_id, stage.spec.register)
        return chosen

    def claim(self, outcome: StageOutcome, config: dict, teacher_runs: dict[str, str]) -> bool:
        """Hold the stage's run (a new one, or the interrupted one to resume); False when another driver holds
        it instead, and the stage then waits for that driver."""
        if outcome.resumed:
            if not self.records.take_over(outcome.run_id, outcome.name):
                outcome.status, outcome.resumed = StageState.WAITING, False
                return False
            return True
        seed = self.plan.stages[outcome.name].seed
        created = self.records.create(outcome.name, outcome.fingerprint, config, teacher_runs, seed)
        if isinstance(created, Unfinished):  # another driver created one first
            self.wait_for(outcome, created)
            return False
        outcome.run_id = created
        return True

    def finish(self, future: Future) -> None:
        outcome = self.outcomes[self.running.pop(future)]
        outcome.seconds = time.perf_counter() - outcome.seconds
        try:
            outcome.chosen = future.result() or {}
            outcome.status = StageState.DONE
        except Exception as err:  # a failed stage fails its descendants, never its siblings
            outcome.status, outcome.error = StageState.FAILED, one_line(err)
        try:  # all epochs' metrics, resumed or not
            outcome.metrics = self.records.end(outcome.run_id, outcome.status == StageState.DONE)
        except TrackingError as err:  # the run stays RUNNING in MLflow; a rerun resumes it
            outcome.status, outcome.error = StageState.FAILED, outcome.error or str(err)

    def release(self) -> None:
        """On the way out: runs still held (an interrupt, an error) may be taken over at once; the launcher's
        actors go."""
        with contextlib.suppress(TrackingError):
            for name in self.running.values():
                self.records.release(self.outcomes[name].run_id)
        self.launcher.close()
