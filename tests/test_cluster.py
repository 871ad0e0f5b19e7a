"""A real two-node Ray cluster on loopback, started by the scripts in cluster/ (token auth on), with the MLflow
server of cluster/mlflow-server.sh (basic auth on): jobs go in through `kdpipe submit` and the Ray Jobs API."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_NODE, TAG_RESUMED, TAG_STAGE
from kdpipe.worker import artifacts
from tests.conftest import FASHION_MNIST

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KDPIPE = [str(BIN / "kdpipe")]
ADMIN_PASSWORD = f"kdpipe-{secrets.token_hex(8)}"  # MLflow wants 12 characters or more


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Cluster:
    dashboard: str
    mlflow: str
    token: str
    env: dict  # a client's environment: the token file, the MLflow login
    storage: Path  # the folder every node shares (KDPIPE_STORAGE on the nodes); the client does not see it

    def kdpipe(self, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*KDPIPE, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    def node_ids(self) -> set[str]:
        reply = requests.get(
            f"{self.dashboard}/api/v0/nodes", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        return {node["node_id"] for node in reply.json()["data"]["result"]["result"] if node["state"] == "ALIVE"}


def agent_port() -> list[str]:
    return ["--dashboard-agent-listen-port", str(free_port())]


def wait_for(what: str, ready, seconds: float, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if ready():
                return
        assert all(p.poll() is None for p in processes), f"a process ended while waiting for {what}"
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready within {seconds} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    shared = root / "shared"  # the storage every node shares
    shared.mkdir()
    ray_temp = tempfile.mkdtemp(prefix="kdp", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray_port, dashboard_port, mlflow_port = free_port(), free_port(), free_port()
    node_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))},
        # The venv last: `ray` and `python3` come from it, while ninja stays the one the other tests' DeepSpeed
        # builds used (another ninja's log reads as stale and rebuilds DeepSpeed's CPU op, a minute each time).
        "PATH": f"{os.environ['PATH']}:{BIN}",
        "RAY_AUTH_TOKEN_PATH": str(root / "ray_token"),
        "KDPIPE_STORAGE": str(shared),
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
        "NUM_CPUS": "1",  # one CPU per node: a stage's 2 workers cannot both fit on one
        "MLFLOW_WORKERS": "1",
    }
    logs = root / "logs"
    logs.mkdir()

    def start(name: str, argv: list[str], **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            env={**node_env, **env},
            stdout=(logs / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, ended as one below
        )

    processes = [
        start(
            "mlflow",
            [str(REPO / "cluster/mlflow-server.sh")],
            MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
            MLFLOW_PORT=str(mlflow_port),
        ),
        start(
            "head",
            # Agent ports of their own: the default one (52365) may be held by this session's local Ray, and a
            # head without its agent takes no jobs.
            [str(REPO / "cluster/start-head.sh"), "--block", "--temp-dir", ray_temp, *agent_port()],
            HEAD_IP="127.0.0.1",
            RAY_PORT=str(ray_port),
            DASHBOARD_PORT=str(dashboard_port),
        ),
    ]
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        token_file = root / "ray_token"
        wait_for("the head's token", lambda: token_file.is_file() and token_file.read_text().strip(), 60, processes)
        token = token_file.read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        wait_for("the dashboard", lambda: requests.get(f"{dashboard}/api/version", headers=headers).ok, 120, processes)
        processes.append(
            start(
                "worker",
                [str(REPO / "cluster/start-worker.sh"), f"127.0.0.1:{ray_port}", "--block", *agent_port()],
                NODE_IP="127.0.0.1",
            )
        )
        client_env = {**node_env, "HOME": str(root)}  # no ~/.ray/auth_token of this machine's user
        found = Cluster(dashboard, f"http://127.0.0.1:{mlflow_port}", token, client_env, shared)
        wait_for("the second node", lambda: len(found.node_ids()) == 2, 120, processes)
        wait_for("mlflow server", lambda: requests.get(f"{found.mlflow}/health").ok, 120, processes)
        yield found
    finally:
        for process in processes:  # `ray start --block` spawns a reaper: its node's processes die with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture()
def mlflow_login(cluster, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    return Tracker(cluster.mlflow)


CLUSTER_DATA = "datasets/fashion-mnist"  # relative: the cluster's storage holds it, the submitting machine does not


def small_quickstart(path: Path, stages: int = 2) -> Path:
    """jobs/quickstart.yaml made small for the test's 2 cores: its teacher (2 epochs, room to stop the job between
    checkpoints) and (with `stages` 2) a student learning from it, on 512 Fashion-MNIST images at a path that
    exists only in the cluster's storage; its relative paths stay relative (to that storage)."""
    job = yaml.safe_load((REPO / "jobs/quickstart.yaml").read_text())
    job["data"] = {
        "source": "fashion-mnist",
        "path": CLUSTER_DATA,
        "train_subset": 512,
        "image_size": 16,
        "batch_size": 32,
        "loader_workers": 0,
    }
    teacher, student = job["stages"][0], job["stages"][-1]
    student["teachers"] = [teacher["name"]]
    job["stages"] = [teacher, student][:stages]
    for stage, epochs in zip(job["stages"], (2, 1), strict=False):
        stage.update(epochs=epochs, workers={"count": 2, "placement": "SPREAD"})
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def teacher_runs(tracker: Tracker) -> list:
    return stage_runs(tracker, "teacher")


def stage_runs(tracker: Tracker, stage: str) -> list:
    experiment = tracker.client.get_experiment_by_name("kdpipe")
    if experiment is None:
        return []
    return tracker.client.search_runs([experiment.experiment_id], f"tags.`{TAG_STAGE}` = '{stage}'")


def test_submit_stop_and_resubmit_resumes_on_two_nodes(cluster, mlflow_login, tmp_path):
    """Issue 7's submit, stop and resubmit; issue 16, point 4: the job's data path exists only in the cluster's
    shared storage, and `kdpipe submit` leaves it to the cluster. The teacher alone: its resumption reads its
    checkpoint back through the MLflow server as a student reads its teacher's weights (test_pipeline)."""
    shutil.copytree(FASHION_MNIST, cluster.storage / CLUSTER_DATA)
    assert not (REPO / CLUSTER_DATA).exists()
    job = small_quickstart(tmp_path / "quickstart.yaml", stages=1)
    submit = ["submit", str(job), "--address", cluster.dashboard, "--tracking-uri", cluster.mlflow]
    first = cluster.kdpipe(*submit)
    assert first.returncode == 0, first.stderr
    first_id = first.stdout.strip()

    # Stop the job once the teacher (2 epochs) has saved its first checkpoint in MLflow. Ray Train's copy of it,
    # in the cluster's storage, comes first: watching that folder spares the MLflow server (one process) a poll a
    # second while the stage trains beside it on the same 2 cores.
    deadline = time.monotonic() + 400
    while not any(cluster.storage.glob("*/ray/*-teacher-*/checkpoint_*/position.json")):
        assert time.monotonic() < deadline, cluster.kdpipe("logs", first_id, "--address", cluster.dashboard).stdout
        time.sleep(0.2)
    while not any(
        artifacts.stored_checkpoints(mlflow_login.artifacts(run.info.run_id)) for run in teacher_runs(mlflow_login)
    ):
        assert time.monotonic() < deadline, "the checkpoint in Ray Train's storage never reached MLflow"
        time.sleep(0.2)
    stopped = cluster.kdpipe("stop", first_id, "--address", cluster.dashboard)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    (interrupted,) = stage_runs(mlflow_login, "teacher")
    assert interrupted.info.status == "RUNNING"  # its driver was stopped: nobody closed it

    second = cluster.kdpipe(*submit)
    assert second.returncode == 0, second.stderr
    second_id = second.stdout.strip()
    followed = cluster.kdpipe("logs", "--follow", second_id, "--address", cluster.dashboard, timeout=400)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr
    assert f"{second_id}: SUCCEEDED" in followed.stderr
    table = {line.split("│")[1].strip(): line for line in followed.stdout.splitlines() if line.count("│") > 4}
    assert "done (resumed)" in table["teacher"]

    # The same teacher run was continued from its checkpoint: exactly one finished run.
    (run,) = stage_runs(mlflow_login, "teacher")
    assert run.info.status == "FINISHED" and run.info.run_id == interrupted.info.run_id
    assert TAG_RESUMED in run.data.tags
    # Its 2 workers ran on the 2 different nodes of the cluster.
    assert {run.data.tags[f"{TAG_NODE}.{rank}"] for rank in (0, 1)} == cluster.node_ids()

    listed = cluster.kdpipe("jobs", "--address", cluster.dashboard).stdout
    assert first_id in listed and "STOPPED" in listed and second_id in listed and "SUCCEEDED" in listed


def test_a_client_without_the_token_or_with_a_wrong_one_is_refused(cluster, tmp_path):
    jobs_api = f"{cluster.dashboard}/api/jobs/"
    assert requests.get(jobs_api, timeout=10).status_code == 401
    assert requests.get(jobs_api, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 403
    assert requests.get(jobs_api, headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10).ok
    job = small_quickstart(tmp_path / "quickstart.yaml")
    no_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}  # and HOME has none
    for env, sent in ((no_token, "no token"), ({**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}, "RAY_AUTH_TOKEN")):
        refused = cluster.kdpipe("submit", str(job), "--address", cluster.dashboard, env=env)
        assert refused.returncode == 2
        assert refused.stdout == "" and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "refused" in refused.stderr and sent in refused.stderr and "Traceback" not in refused.stderr
    # MLflow's own authentication is on too: no login, no runs.
    search = f"{cluster.mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    assert requests.get(search, auth=("admin", ADMIN_PASSWORD), timeout=10).ok


def test_paths_are_the_clusters_but_a_bad_job_is_refused_before_submitting(cluster, tmp_path):
    """Issue 16, point 4: a DAG or method mistake is refused on the submitting machine, one line, exit 2; a data
    path the cluster does not have fails the job there, one line in its log."""
    job = yaml.safe_load(small_quickstart(tmp_path / "job.yaml").read_text())
    job["stages"][0]["teachers"] = ["student"]  # a cycle
    (tmp_path / "cycle.yaml").write_text(yaml.safe_dump(job))
    refused = cluster.kdpipe("submit", str(tmp_path / "cycle.yaml"), "--address", cluster.dashboard)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "cycle" in refused.stderr and refused.stdout == ""

    job["stages"][0]["teachers"] = []
    job["data"]["path"] = "datasets/nowhere"
    (tmp_path / "nowhere.yaml").write_text(yaml.safe_dump(job))
    submitted = cluster.kdpipe("submit", str(tmp_path / "nowhere.yaml"), "--address", cluster.dashboard)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    followed = cluster.kdpipe("logs", "--follow", job_id, "--address", cluster.dashboard, timeout=120)
    assert followed.returncode == 1 and f"{job_id}: FAILED" in followed.stderr
    errors = [line for line in followed.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.path: no such file or folder 'datasets/nowhere'" in errors[0], followed.stdout
    assert "Traceback" not in followed.stdout
