"""`RunArtifacts`, in one process against real stores: a stage's ranks move their run's files through its artifact
URI alone, without the tracking store; and rank 0's metrics and tags, through the job's tracking actor."""

from __future__ import annotations

import json
import socket

import pytest

from kdpipe.tracking import TrackingError
from kdpipe.tracking.files import RunArtifacts
from kdpipe.tracking.store import Tracker
from kdpipe.worker.tracking_actor import ActorTracker, open_tracking_actor


def test_a_runs_files_move_by_its_artifact_uri_without_opening_the_tracking_store(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = tracker.client.create_run(tracker.experiment_id("files")).info.run_id
    # A sqlite store opened at this path would create its database there.
    unopened = tmp_path / "elsewhere" / "mlflow.db"
    files = RunArtifacts(tracker.artifact_uri(run_id), f"sqlite:///{unopened}")
    (tmp_path / "rank-1.pt").write_bytes(b"rank 1")
    (tmp_path / "position.json").write_text("{}")

    files.log_files([tmp_path / "rank-1.pt"], "checkpoints/step-4")
    files.log_files([tmp_path / "rank-1.pt", tmp_path / "position.json"], "checkpoints/step-8")

    assert files.folders_holding("checkpoints", "position.json") == ["step-8"]
    assert sorted(files.list_folder("checkpoints")) == ["step-4", "step-8"]
    with files.downloaded("checkpoints/step-8") as folder:
        assert (folder / "rank-1.pt").read_bytes() == b"rank 1"
    with files.downloaded("checkpoints/step-8", ["position.json"]) as folder:
        assert [path.name for path in folder.iterdir()] == ["position.json"]
    files.delete(["checkpoints/step-4"])
    assert not unopened.parent.exists()
    # The driver, through the store, sees what the rank wrote.
    assert tracker.artifacts(run_id).list_folder("checkpoints") == ["step-8"]
    assert tracker.artifacts(run_id).holds("checkpoints/step-8/rank-1.pt")


def test_an_unreachable_tracking_server_is_one_line_naming_it(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    files = RunArtifacts("mlflow-artifacts:/1/run/artifacts", uri)
    (tmp_path / "rank-0.pt").write_bytes(b"rank 0")
    with pytest.raises(TrackingError, match=f"^MLflow tracking at {uri} failed: ") as failure:
        files.log_files([tmp_path / "rank-0.pt"], "checkpoints/step-2")
    assert "\n" not in str(failure.value)


def test_rank_0_logs_through_the_jobs_tracking_actor_and_its_failures_arrive_as_tracking_errors(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    run_id = tracker.start_job_run(tracker.experiment_id("actor"), "job", {})
    actor = open_tracking_actor("actor-test", uri)
    remote = ActorTracker("actor-test")  # as rank 0 finds it: by the job's name

    remote.log_metrics(run_id, {"train/loss": 0.5, "val/top1": 0.25}, step=3)
    remote.set_tags(run_id, {"kdpipe.node.0": "node-a"})

    assert remote.metric_history(run_id, ["train/loss"]) == {"train/loss": [(3, 0.5)]}
    run = tracker.get_run(run_id)  # the driver's own store sees it
    assert run.data.metrics == {"train/loss": 0.5, "val/top1": 0.25}
    assert run.data.tags["kdpipe.node.0"] == "node-a"
    with pytest.raises(TrackingError, match="^MLflow tracking at .* failed: ") as failure:
        remote.set_tags("no-such-run", {"kdpipe.node.0": "node-a"})
    assert "\n" not in str(failure.value)  # the actor's own one-line error, not Ray's traceback around it
    ray_local.kill(actor)


def test_experiments_open_as_model_training_and_stage_runs_are_described_with_their_data(tmp_path):
    """What MLflow's UI shows (issue 35): the experiment marked as model training (new, or made before kdpipe marked
    its experiments), a stage run's description, and its data as a dataset input."""
    from mlflow.entities import ViewType

    from kdpipe.driver.mlflow_records import data_ref
    from kdpipe.job.spec import DataSpec

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    old = tracker.client.create_experiment("made-before")
    for name in ("new", "made-before"):
        experiment = tracker.client.get_experiment(tracker.experiment_id(name))
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracker.experiment_id("made-before") == old
    assert len(tracker.client.search_experiments(view_type=ViewType.ALL)) == 3  # with MLflow's Default

    config = {"model": "resnet8", "method": "kd", "epochs": 1}
    run_id = tracker.start_stage_run(old, "", "quickstart", "student", "f" * 64, config, {"assistant": "r1"})
    ref = data_ref(DataSpec(source="imagefolder", path=str(tmp_path / "images")), "0123456789abcdef")
    tracker.log_dataset(run_id, ref)

    run = tracker.get_run(run_id)
    assert run.data.tags["mlflow.note.content"] == (
        "resnet8 trained by kd from assistant: stage student of kdpipe job quickstart"
    )
    (given,) = run.inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("imagefolder:images", "0123456789ab")
    assert json.loads(given.dataset.source) == {"uri": str(tmp_path / "images")}
    assert [(tag.key, tag.value) for tag in given.tags] == [("mlflow.data.context", "train")]
