"""Nothing waits on a cluster that cannot answer: RAY_ADDRESS that does not answer is one line within seconds,
a stale cluster record does not capture `kdpipe run`, workers that can never fit fail at once (on a cluster that
cannot grow) or at their deadline (on one that may), and a hung test fails at its deadline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kdpipe.cli import main
from kdpipe.driver.capacity import WorkersCannotFit, check_answers, check_fits, fits
from kdpipe.errors import UserError
from kdpipe.job.spec import WorkersSpec
from tests.conftest import KDPIPE, cluster_env, tiny_job, write_job

NODE = {"CPU": 4.0, "GPU": 1.0}


def workers(count: int, cpus: float = 1, gpus: float = 0, placement: str = "PACK") -> WorkersSpec:
    return WorkersSpec(count=count, cpus=cpus, gpus=gpus, placement=placement)


def test_workers_fit_as_their_placement_strategy_places_them():
    two_nodes = [NODE, NODE]
    assert fits(workers(8), two_nodes) and not fits(workers(9), two_nodes)  # PACK and SPREAD: anywhere
    assert fits(workers(3, cpus=2.5), [NODE, NODE, NODE]) and not fits(workers(4, cpus=2.5), [NODE, NODE, NODE])
    assert fits(workers(4, placement="STRICT_PACK"), two_nodes)
    assert not fits(workers(5, placement="STRICT_PACK"), two_nodes)  # 8 CPUs in all, 4 on any one node
    assert fits(workers(2, placement="STRICT_SPREAD"), two_nodes)
    assert not fits(workers(3, placement="STRICT_SPREAD"), two_nodes)
    assert fits(workers(2, gpus=1), two_nodes) and not fits(workers(3, gpus=1), two_nodes)
    assert fits(workers(4, gpus=0.5), two_nodes) and not fits(workers(1, gpus=1), [{"CPU": 64.0}])


def test_workers_that_can_never_fit_are_named_with_what_the_cluster_holds():
    with pytest.raises(WorkersCannotFit) as caught:
        check_fits(workers(8, gpus=1), [NODE, {"CPU": 2.0}])
    message = str(caught.value)
    assert "\n" not in message
    assert "8 workers of 1 CPU, 1 GPU each (PACK) can never fit" in message
    assert "holds 6 CPU, 1 GPU on 2 node(s)" in message


def free_port() -> int:
    """A loopback port where nothing listens (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_ray_address_where_nothing_listens_is_one_line_within_seconds():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        check_answers(address)
    assert time.monotonic() - started < 6
    assert str(caught.value).startswith(f"RAY_ADDRESS: no Ray cluster answers at {address}")
    with pytest.raises(UserError, match="expected HOST:PORT"):
        check_answers("nowhere")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_answers(f"ray://127.0.0.1:{listening.getsockname()[1]}")


def test_a_stage_that_can_never_fit_the_local_cluster_fails_at_once(ray_local, tmp_path, capsys):
    """The test session's Ray holds 2 CPUs and cannot grow: a stage asking for 8 workers fails before it waits,
    in one line, and its student is skipped."""
    stages = [
        {"name": "huge", "model": "resnet8", "epochs": 1, "workers": {"count": 8}},
        {"name": "student", "model": "resnet8", "teachers": ["huge"], "method": "kd", "epochs": 1},
    ]
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages))
    started = time.monotonic()
    assert main(["run", str(job)]) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("huge: "))
    assert "WorkersCannotFit: workers: 8 workers of 1 CPU each (PACK) can never fit" in line
    assert "holds 2 CPU on 1 node(s) and cannot grow" in line
    assert "student: a teacher stage did not finish" in err
    assert time.monotonic() - started < 30


def test_a_stage_that_cannot_be_placed_on_a_cluster_that_may_grow_fails_at_its_deadline(ray_local, tmp_path):
    """A `kdpipe run` that joins the session's Ray (RAY_ADDRESS: a cluster that may grow) launches the 8 workers and
    waits for them, in Ray Train's placement attempts (1 s here), up to the stage's deadline; then the stage fails in
    one line naming what it asked and what the cluster holds, its student is skipped, and nothing of it is left."""
    from tests.test_search import live_placement_groups

    stages = [
        {"name": "huge", "model": "resnet8", "epochs": 1, "workers": {"count": 8, "start_timeout": 4}},
        {"name": "student", "model": "resnet8", "teachers": ["huge"], "method": "kd", "epochs": 1},
    ]
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages))
    env = cluster_env(ray_local, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="1")
    started = time.monotonic()
    done = subprocess.run([*KDPIPE, "run", str(job)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("huge: "))
    assert "WorkersNotPlaced: workers: 8 workers of 1 CPU each (PACK) were not placed within 4 s" in line
    assert "the Ray cluster holds 2 CPU (" in line and "on 1 node(s)" in line
    assert "student: a teacher stage did not finish" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
    assert not live_placement_groups()


def stale_record(tmp: Path) -> str:
    """Ray's record of a cluster, under its temp folder, pointing where nothing listens."""
    address = f"127.0.0.1:{free_port()}"
    (tmp / "ray_current_cluster").write_text(address)
    return address


def test_a_stale_cluster_record_neither_captures_nor_hangs_kdpipe_run(tmp_path):
    """With RAY_ADDRESS unset, `kdpipe run` trains on a local Ray of its own, though Ray's record of the last
    `ray start` names an address where nothing listens; with RAY_ADDRESS set to that address, it fails in one line
    within seconds."""
    stages = [{"name": "teacher", "model": "resnet8", "epochs": 1, "workers": {"count": 1}}]
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages, train_size=64, batch_size=32))
    with tempfile.TemporaryDirectory(prefix="kdp", dir="/tmp") as short:  # Ray's socket paths must stay short
        address = stale_record(Path(short))
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = short
        command = [sys.executable, "-m", "kdpipe", "run", str(job)]
        joined = subprocess.run(
            command, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=60
        )
        assert joined.returncode == 2, joined.stderr[-2000:]
        # the last line; MLflow's own lines before it say it created the new store's tables
        assert joined.stderr.splitlines()[-1].startswith(f"error: RAY_ADDRESS: no Ray cluster answers at {address}")
        assert "Traceback" not in joined.stderr
        own = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert own.returncode == 0, own.stdout[-2000:] + own.stderr[-2000:]
        assert "done" in own.stdout


HANGS = """
import time


def test_hangs():
    time.sleep(600)
"""


def test_a_hung_test_fails_at_its_deadline_with_a_stack_dump(tmp_path):
    """pytest-timeout caps every test (pyproject.toml); a test made to hang, written here and run in a pytest of its
    own with a 2 s cap, fails within it and prints where it hung."""
    (tmp_path / "test_hangs.py").write_text(HANGS)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--timeout=2", str(tmp_path / "test_hangs.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout[-2000:]
    assert time.monotonic() - started < 30
    assert "Timeout" in done.stdout and "time.sleep(600)" in done.stdout
    assert "1 failed" in done.stdout
