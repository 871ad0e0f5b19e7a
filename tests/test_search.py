"""Issue 13: a stage's `search:` block runs a Ray Tune search whose trials are the stage itself, each a 2-worker
DeepSpeed run over gloo, on the session's 2-CPU Ray (one trial fits at a time, `max_concurrent` unset).

One search, interrupted for real: a Ray Train worker of the first trial is killed by pid (Tune runs the trial again,
from its checkpoint), then the driver while the second trial trains; the rerun continues the search. Then a third
run trains nothing. What a changed search retrains: `test_fingerprint`; bad `search:` blocks: `test_bad_input`.

The searched stage distils from the finished chain's teacher (reused, in the chain's MLflow and workdir) on another
seed than the chain's students, so its views are new to the teacher-output cache: issue 15's search fills the
cache before the trials, and no trial runs the teacher.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import torch
from ray import tune
from safetensors.torch import load_file

from kdpipe.cli import main
from kdpipe.driver.launch import ray_run_name, storage_path
from kdpipe.driver.runner import run_job
from kdpipe.models import load_weights
from kdpipe.plan import load_plan
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_BEST_TRIAL, TAG_PRUNED, TAG_RESUMED, TAG_TRIAL
from kdpipe.worker import artifacts
from tests.conftest import (
    CHAIN,
    CHAIN_DATA,
    CHAIN_STEPS_PER_EPOCH,
    KDPIPE,
    cluster_env,
    teacher_batches,
    tiny_job,
    write_job,
)
from tests.test_resume import train_workers, wait_until_workers_exit

TRIALS, EPOCHS, STEPS = 3, 2, CHAIN_STEPS_PER_EPOCH
PARENT = "mlflow.parentRunId"
STAGES = [
    CHAIN[0],
    {
        "name": "searched",
        "model": "resnet8",
        "teachers": ["teacher"],
        "method": "kd",
        "epochs": EPOCHS,
        "seeds": [1],
        "search": {
            "trials": TRIALS,
            # The training loss: on a few synthetic batches top-1 often ties between trials, and ASHA stops no tie.
            "metric": "train/loss",
            "mode": "min",
            "space": {
                "optimizer.lr": {"distribution": "loguniform", "low": 0.0001, "high": 0.5},
                "optimizer.weight_decay": {"distribution": "choice", "values": [0, 0.0005]},
            },
        },
    },
    {"name": "pupil", "model": "resnet8", "teachers": ["searched"], "method": "kd", "epochs": 1},
]


def trial_runs(tracker: Tracker) -> list:
    experiment = tracker.client.get_experiment_by_name("tests")
    if experiment is None:
        return []
    which = "tags.`kdpipe.kind` = 'trial'"
    return tracker.client.search_runs([experiment.experiment_id], which, order_by=["attributes.start_time ASC"])


def kill_a_worker_of_the_first_trial(storage: Path, driver: subprocess.Popen) -> None:
    """SIGKILL a Ray Train worker once the first trial's Ray Train run holds a checkpoint: its controller has written
    the run's checkpoint list into Ray Train's storage (watched on disk: the trial trains for a few seconds, and
    polling MLflow could miss them)."""
    deadline = time.monotonic() + 400
    while not any(storage.glob("search-searched-*/checkpoint_manager_snapshot.json")):
        assert time.monotonic() < deadline and driver.poll() is None, "no checkpoint of the first trial"
        time.sleep(0.05)
    train_workers()[0].send_signal(signal.SIGKILL)


def wait_for_second_trial(tracker: Tracker, driver: subprocess.Popen) -> None:
    """Until the first trial finished and the second one saved a checkpoint."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        runs = trial_runs(tracker)
        if len(runs) >= 2 and artifacts.stored_checkpoints(tracker.artifacts(runs[1].info.run_id)):
            assert runs[0].info.status == "FINISHED"
            return
        assert driver.poll() is None, "the driver ended before the second trial saved a checkpoint"
        time.sleep(0.3)
    raise AssertionError("no checkpoint of a second trial within 400 s")


def live_placement_groups() -> list:
    from ray.util.state import list_placement_groups

    return [group for group in list_placement_groups(detail=True) if group.state != "REMOVED"]


def test_a_search_killed_mid_trial_resumes_and_its_best_trial_teaches_downstream(ray_local, finished_chain, capsys):
    """Points 1-4: ASHA prunes, trials nest under the stage run under the job run, the pupil learns from the best
    trial's weights, no placement group is left, a killed driver's search continues (finished trials kept, the
    interrupted one resumed in its own run, exactly `trials` runs), and a rerun trains nothing. A trial whose
    worker died is run again by Tune and goes on from its checkpoint in its own run."""
    root = finished_chain[0]
    job = tiny_job(root, STAGES, **CHAIN_DATA)
    job.update(name="search", checkpoint={"every_steps": 4, "every_minutes": 0})
    path = write_job(root / "search.yaml", job)
    tracker, storage = Tracker(job["tracking"]["uri"]), Path(storage_path(job["workdir"]))  # Ray Train's and Tune's
    driver = subprocess.Popen([*KDPIPE, "run", str(path)], env=cluster_env(ray_local), stderr=subprocess.DEVNULL)
    kill_a_worker_of_the_first_trial(storage, driver)
    wait_for_second_trial(tracker, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_until_workers_exit()
    first, second = trial_runs(tracker)[:2]
    stored = artifacts.stored_checkpoints(tracker.artifacts(second.info.run_id))
    assert tracker.client.get_run(second.info.run_id).info.status == "RUNNING"

    outcomes = run_job(load_plan(path))

    assert {n: o.status for n, o in outcomes.items()} == {"teacher": "reused", "searched": "done", "pupil": "done"}
    searched = outcomes["searched"]
    assert searched.resumed and searched.run_id == first.data.tags[PARENT]
    runs = trial_runs(tracker)
    assert len(runs) == TRIALS and len({run.data.tags[TAG_TRIAL] for run in runs}) == TRIALS
    ids = [run.info.run_id for run in runs]
    assert ids[:2] == [first.info.run_id, second.info.run_id]
    # The finished trial was not trained again; the interrupted one went on from its checkpoint in its own run.
    assert tracker.client.get_run(ids[0]).info.end_time == first.info.end_time
    resumed = tracker.client.get_run(ids[1])
    assert resumed.data.tags[TAG_RESUMED].startswith(stored[-1])
    # Its step count goes on: epoch e ends at step (e + 1) * steps-per-epoch (an epoch the kill cut short of its
    # next checkpoint ends twice, at the same step). So do the first trial's, run again by Tune after its worker
    # died: from Ray Train's checkpoint, in its own run, to its last epoch.
    for run_id in ids[:2]:
        steps = {(m.step, int(m.value)) for m in tracker.client.get_metric_history(run_id, "global_step")}
        assert steps == {(epoch, (epoch + 1) * STEPS) for epoch in range(max(step for step, _ in steps) + 1)}
    assert tracker.client.get_run(ids[0]).data.tags[TAG_RESUMED].endswith("(Ray Train checkpoint)")
    assert tracker.client.get_run(ids[0]).data.metrics["global_step"] == EPOCHS * STEPS
    experiment = storage / ray_run_name("search", "searched", searched.run_id)
    failures = {trial.trial_id: trial.num_failures for trial in tune.ExperimentAnalysis(str(experiment)).trials}
    assert failures[first.data.tags[TAG_TRIAL]] == 1 and sum(failures.values()) == 1, failures
    # Nesting: job run > stage run > trial runs.
    stage_run = tracker.client.get_run(searched.run_id)
    assert tracker.client.get_run(stage_run.data.tags[PARENT]).data.tags["kdpipe.kind"] == "job"
    assert all(run.data.tags[PARENT] == searched.run_id for run in runs)
    # ASHA stopped at least one trial after its first epoch: KILLED, tagged, one epoch of metrics.
    pruned = [run for run in runs if run.info.status == "KILLED"]
    assert pruned and all(TAG_PRUNED in run.data.tags for run in pruned)
    for run in pruned:
        assert len(tracker.client.get_metric_history(run.info.run_id, "train/loss")) < EPOCHS
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert all(TAG_PRUNED not in run.data.tags for run in finished)
    assert len(finished) + len(pruned) == TRIALS
    # The best of the recorded trials is the stage's result.
    best = min(finished, key=lambda run: run.data.metrics["train/loss"])
    assert stage_run.data.tags[TAG_BEST_TRIAL] == best.info.run_id
    chosen = json.loads(Path(tracker.client.download_artifacts(searched.run_id, artifacts.SEARCH_BEST)).read_text())
    assert chosen["values"] == json.loads(best.data.tags["kdpipe.trial.values"])
    assert stage_run.data.metrics["train/loss"] == best.data.metrics["train/loss"]
    plots = {a.path for a in tracker.client.list_artifacts(searched.run_id, artifacts.PLOTS)}
    assert plots == {"plots/search_epochs.png", "plots/search_values.png"}
    # The pupil learned from the best trial's weights.
    probe = load_file(tracker.client.download_artifacts(outcomes["pupil"].run_id, "teachers/probe.safetensors"))
    with tracker.artifacts(best.info.run_id).downloaded(artifacts.WEIGHTS) as folder, torch.no_grad():
        expected = load_weights(folder).eval()(probe["images"])
    torch.testing.assert_close(probe["searched"], expected, rtol=1e-4, atol=1e-4)
    # Issue 15, point 3: before the trials, the search ran the teacher over all their views once (the killed run);
    # the rerun's restored search found them all cached and filled nothing; no trial ran the teacher.
    before = tracker.metric_history(searched.run_id, ["search/teacher_cache/computed", "search/teacher_cache/read"])
    assert before == {"search/teacher_cache/computed": [(0, 2 * STEPS * EPOCHS)], "search/teacher_cache/read": [(0, 0)]}
    for run in runs:
        batches = teacher_batches(tracker, run.info.run_id)
        assert batches and all(computed == 0 and read > 0 for computed, read in batches), batches
    # Point 2: nothing of the search holds the cluster afterwards.
    deadline = time.monotonic() + 30
    while live_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not live_placement_groups()

    again = run_job(load_plan(path))

    assert {o.status for o in again.values()} == {"reused"}
    assert again["searched"].run_id == searched.run_id and again["searched"].chosen == searched.chosen
    assert [run.info.run_id for run in trial_runs(tracker)] == ids
    capsys.readouterr()
    assert main(["status", str(path)]) == 0
    table = capsys.readouterr().out
    assert table.count("└ searched trial") == TRIALS and f"{TRIALS}/{TRIALS} trials" in table and " pruned " in table
