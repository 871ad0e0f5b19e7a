"""The runner's decisions (`kdpipe.driver.runner.JobRunner`) without Ray or MLflow: the record of runs is kept in
a dict and launching is the test's own function, so each case takes milliseconds. What the MLflow record and Ray
launching do for real is end to end in test_pipeline, test_resume, test_lease and test_fingerprint."""

from __future__ import annotations

import itertools
import threading

import pytest

from kdpipe.data import PreparedData
from kdpipe.driver import runner as runner_module
from kdpipe.driver.records import Finished, Unfinished
from kdpipe.driver.runner import JobRunner
from kdpipe.driver.state import StageState
from kdpipe.plan import load_plan
from tests.conftest import tiny_job, write_job

DATA = PreparedData("shards", "/nowhere", 32, 10, "synthetic", "data-id", 2000)
OTHER_DRIVER = "by the kdpipe driver pid 1 on elsewhere"


class MemoryRecords:
    """`StageRecords` in a dict: run id -> what MLflow would hold of it."""

    uri = "memory://"

    def __init__(self):
        self.runs: dict[str, dict] = {}
        self.ids = (f"run{n}" for n in itertools.count())
        self.reused: dict[str, str] = {}
        self.published: list[tuple[str, str | None, str]] = []  # run, registered name, the run's status then

    def add(self, fingerprint: str, status: str, holder: str = "", checkpointed: bool = False) -> str:
        run_id = next(self.ids)
        self.runs[run_id] = {"fp": fingerprint, "status": status, "holder": holder, "checkpointed": checkpointed}
        return run_id

    def newest(self, fingerprint: str, finished: bool) -> str | None:
        found = [
            r for r, run in self.runs.items() if run["fp"] == fingerprint and (run["status"] == "FINISHED") == finished
        ]
        return found[-1] if found else None

    def start_job(self, name, spec, settings) -> None:
        self.job = name

    def finished(self, fingerprint):
        run_id = self.newest(fingerprint, True)
        return Finished(run_id, {"val/top1": 0.5}) if run_id else None

    def unfinished(self, fingerprint):
        run_id = self.newest(fingerprint, False)
        if run_id is None:
            return None
        run = self.runs[run_id]
        return Unfinished(run_id, run["holder"] if run["holder"] != "us" else "", run["checkpointed"])

    def holder(self, run_id):
        return self.runs[run_id]["holder"]

    def create(self, stage, fingerprint, config, teacher_runs, seed):
        other = self.unfinished(fingerprint)
        if other is not None and other.holder:
            return other
        return self.add(fingerprint, "RUNNING", "us")

    def take_over(self, run_id, stage):
        if self.runs[run_id]["holder"] not in ("", "us"):
            return False
        self.runs[run_id].update(holder="us", status="RUNNING")
        return True

    def artifact_uri(self, run_id):
        return f"memory://{run_id}"

    def mark_reused(self, stage, run_id):
        self.reused[stage] = run_id

    def end(self, run_id, ok):
        self.runs[run_id].update(status="FINISHED" if ok else "FAILED", holder="")
        return {"val/top1": 0.5} if ok else {}

    def publish(self, run_id, name):
        self.published.append((run_id, name, self.runs[run_id]["status"]))

    def renew(self, run_ids):
        pass

    def release(self, run_id):
        self.runs[run_id]["holder"] = ""

    def end_job(self, title, results, baseline, drawn, ok):
        self.job_ok = ok


class Launcher:
    """Trains nothing: records each launch, fails the stages named in `fail`, and makes the stages named in
    `together` wait for each other (a barrier that breaks after 5 s if they do not run side by side)."""

    def __init__(self, fail=(), together=()):
        self.fail, self.launched, self.lock = set(fail), [], threading.Lock()
        self.barrier = threading.Barrier(len(together), timeout=5) if together else None
        self.together = set(together)
        self.resumable_runs: set[str] = set()

    def resumable(self, stage, run_id):
        return run_id in self.resumable_runs

    def prepare(self):
        pass

    def launch(self, task, stage):
        with self.lock:
            self.launched.append((task.stage.name, task.run_id, tuple(t.stage for t in task.teachers)))
        if task.stage.name in self.together:
            self.barrier.wait()
        if task.stage.name in self.fail:
            raise RuntimeError("the worker group died\nRuntimeError: out of memory")
        return {}

    def progress(self):
        return {}

    def close(self):
        pass


STAGES = [
    {"name": "teacher", "model": "resnet8", "epochs": 1},
    {"name": "baseline", "model": "resnet8", "epochs": 1},
    {"name": "assistant", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 1},
    {"name": "student", "model": "resnet8", "teachers": ["assistant"], "method": "kd", "epochs": 1},
]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(runner_module, "POLL_SECONDS", 0.01)


@pytest.fixture
def plan(tmp_path):
    return load_plan(write_job(tmp_path / "job.yaml", tiny_job(tmp_path, STAGES)))


def run(plan, records, launcher, force=()):
    return JobRunner(plan, DATA, records, launcher).run(force)


def test_a_new_job_trains_teachers_before_students_and_a_rerun_reuses_everything(plan):
    records, launcher = MemoryRecords(), Launcher()
    outcomes = run(plan, records, launcher)
    assert {o.status for o in outcomes.values()} == {StageState.DONE} and records.job_ok
    order = [name for name, _, _ in launcher.launched]
    assert order.index("teacher") < order.index("assistant") < order.index("student")
    student = next(launch for launch in launcher.launched if launch[0] == "student")
    assert student[2] == ("assistant",)
    again = Launcher()
    rerun = run(plan, records, again)
    assert again.launched == [] and {o.status for o in rerun.values()} == {StageState.REUSED}
    assert records.reused == {name: outcomes[name].run_id for name in outcomes}


def test_each_trained_stage_is_published_before_it_finishes_and_a_reused_one_when_it_registers(tmp_path):
    """A stage's model is logged (and registered, with `register:`) while its run still runs: a finished run
    always holds its model. A reused stage is published again only where it asks to be registered (its name may
    be new); the MLflow layer keeps that from making a second version."""
    stages = [dict(STAGES[0], register="teacher-model"), STAGES[1]]
    plan = load_plan(write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages)))
    records = MemoryRecords()
    outcomes = run(plan, records, Launcher())
    teacher, baseline = outcomes["teacher"].run_id, outcomes["baseline"].run_id
    assert sorted(records.published) == sorted([(teacher, "teacher-model", "RUNNING"), (baseline, None, "RUNNING")])
    records.published.clear()
    run(plan, records, Launcher())
    assert records.published == [(teacher, "teacher-model", "FINISHED")]


def test_independent_stages_run_side_by_side(plan):
    """The teacher and the baseline share no path: both are launched before either ends (the barrier holds each
    until the other arrives)."""
    launcher = Launcher(together=("teacher", "baseline"))
    outcomes = run(plan, MemoryRecords(), launcher)
    assert outcomes["teacher"].status == outcomes["baseline"].status == StageState.DONE


def test_a_failed_stage_skips_its_students_and_not_its_siblings(plan):
    records, launcher = MemoryRecords(), Launcher(fail=("assistant",))
    outcomes = run(plan, records, launcher)
    assert outcomes["assistant"].status == StageState.FAILED
    assert outcomes["assistant"].error == "RuntimeError: RuntimeError: out of memory"
    assert outcomes["student"].status == StageState.SKIPPED and outcomes["student"].error
    assert outcomes["teacher"].status == outcomes["baseline"].status == StageState.DONE
    assert "student" not in [name for name, _, _ in launcher.launched] and not records.job_ok


def test_an_interrupted_stage_resumes_in_its_own_run(plan):
    """A run left RUNNING by a dead driver resumes where a checkpoint exists (in the record, or in the
    launcher's storage); without one, the stage trains in a new run."""
    prints = plan.fingerprints(DATA.identity)
    records, launcher = MemoryRecords(), Launcher()
    kept = records.add(prints["teacher"], "RUNNING", checkpointed=True)
    in_storage = records.add(prints["baseline"], "FAILED")
    launcher.resumable_runs.add(in_storage)
    lost = records.add(prints["assistant"], "RUNNING")
    outcomes = run(plan, records, launcher)
    assert outcomes["teacher"].resumed and outcomes["teacher"].run_id == kept
    assert outcomes["baseline"].resumed and outcomes["baseline"].run_id == in_storage
    assert not outcomes["assistant"].resumed and outcomes["assistant"].run_id != lost
    assert {o.status for o in outcomes.values()} == {StageState.DONE}


def test_a_stage_another_driver_trains_is_waited_for_then_reused(plan):
    prints = plan.fingerprints(DATA.identity)
    records, launcher = MemoryRecords(), Launcher()
    theirs = records.add(prints["teacher"], "RUNNING", holder=OTHER_DRIVER)
    seen: list[tuple[StageState, str]] = []

    def other_driver_finishes(outcomes, live):
        seen.append((outcomes["teacher"].status, outcomes["teacher"].error))
        if len(seen) == 3:
            records.end(theirs, True)

    outcomes = JobRunner(plan, DATA, records, launcher).run((), other_driver_finishes)
    assert seen[0] == (StageState.WAITING, f"run {theirs} is being trained {OTHER_DRIVER}")
    assert outcomes["teacher"].status == StageState.REUSED and outcomes["teacher"].run_id == theirs
    assert "teacher" not in [name for name, _, _ in launcher.launched]
    assert outcomes["student"].status == StageState.DONE


def test_force_retrains_a_stage_and_everything_downstream_in_new_runs(plan):
    records = MemoryRecords()
    first = run(plan, records, Launcher())
    launcher = Launcher()
    forced = run(plan, records, launcher, force=("assistant",))
    assert sorted(name for name, _, _ in launcher.launched) == ["assistant", "student"]
    assert forced["teacher"].status == forced["baseline"].status == StageState.REUSED
    assert forced["assistant"].run_id != first["assistant"].run_id
