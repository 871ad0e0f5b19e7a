"""Shared fixtures: one real local Ray instance for the whole session, and job files written into tmp folders."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_MNIST = SHARED_DATA / "fashion-mnist"


@pytest.fixture(scope="session")
def process_group():
    """This process as a torch.distributed group of one, as the engine runs outside Ray (no network, no peers)."""
    import torch

    from kdpipe.worker.engine import single_process_group

    single_process_group(torch.device("cpu"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # The dashboard serves the State API, which Ray Train's placement-group cleaner needs in a search.
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


CHAIN_MODEL = "tiny-student"  # the registered model the chain's student becomes (test_deploy serves it)
# A teacher -> assistant -> student chain on small synthetic data, all ZeRO-2: their optimizer state is partitioned
# over the 2 ranks, which makes their interruption and resumption matter most (test_resume interrupts the student,
# the last stage, so its rerun retrains nothing else; and retrains the teacher alone, through faults, to end where
# the chain's teacher ended).
CHAIN = [
    {"name": "teacher", "model": "resnet8", "epochs": 3, "optimizer": {"lr": 0.1}, "deepspeed": {"zero_stage": 2}},
    {
        "name": "assistant",
        "model": "resnet8",
        "teachers": ["teacher"],
        "method": "kd",
        "epochs": 3,
        "deepspeed": {"zero_stage": 2},
    },
    {
        "name": "student",
        "model": "resnet8",
        "teachers": ["assistant"],
        "method": "kd",
        "epochs": 2,
        "deepspeed": {"zero_stage": 2},
        "result": "best",
        "register": CHAIN_MODEL,
    },
]
CHAIN_DATA = {"train_size": 512, "val_size": 128}
CHAIN_STEPS_PER_EPOCH = 512 // 2 // 32  # train_size / workers / batch_size


@pytest.fixture(scope="session")
def finished_chain(ray_local, tmp_path_factory):
    """The chain, run once without interruption: what test_pipeline checks, and the reference a resumed run of
    the same job (test_resume) must match."""
    from kdpipe.driver.runner import run_job
    from kdpipe.plan import load_plan

    root = tmp_path_factory.mktemp("chain")
    plan = load_plan(write_job(root / "job.yaml", tiny_job(root, CHAIN, **CHAIN_DATA)))
    return root, plan, run_job(plan)


# A teacher and a student over seeds [0, 1]: four stages of one worker each, two of which fit on the 2 CPUs at once.
ONE_WORKER = {"workers": {"count": 1}}
SEEDED_PAIR = [
    {"name": "teacher", "model": "resnet8", "epochs": 1, "optimizer": {"lr": 0.1}, **ONE_WORKER},
    {"name": "student", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 1, **ONE_WORKER},
]
REPEATS = ("teacher-s0", "teacher-s1", "student-s0", "student-s1")  # its stages as they run


@dataclass
class Drivers:
    path: Path  # the job file
    tracking_uri: str
    pids: list[int]
    returncodes: list[int]
    outputs: list[tuple[str, str]]  # each driver's stdout and stderr
    cpu: dict[int, float]  # each driver's own CPU seconds, last seen alive
    wall: float


@pytest.fixture(scope="session")
def two_drivers_over_seeds(ray_local, tmp_path_factory) -> Drivers:
    """The seeded pair run by two real `kdpipe run` processes started at the same moment: what test_lease checks
    of the race (each stage trained once) and test_seeds of the repeats (each student from its seed's teacher)."""
    root = tmp_path_factory.mktemp("seeds")
    job = tiny_job(root, SEEDED_PAIR, train_size=256, val_size=64)
    job.update(seeds=[0, 1], baseline="teacher")
    path = write_job(root / "job.yaml", job)
    env = cluster_env(ray_local, COLUMNS="200")
    drivers = [
        subprocess.Popen([*KDPIPE, "run", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    started = time.monotonic()
    cpu = {driver.pid: 0.0 for driver in drivers}
    sampler = threading.Thread(target=sample_cpu, args=(drivers, cpu), daemon=True)
    sampler.start()
    outputs = [tuple(part.decode() for part in driver.communicate(timeout=600)) for driver in drivers]
    wall = time.monotonic() - started
    return Drivers(
        path, job["tracking"]["uri"], [d.pid for d in drivers], [d.returncode for d in drivers], outputs, cpu, wall
    )


def sample_cpu(drivers: list[subprocess.Popen], cpu: dict[int, float]) -> None:
    while any(driver.poll() is None for driver in drivers):
        for driver in drivers:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(driver.pid).cpu_times()
                cpu[driver.pid] = times.user + times.system
        time.sleep(0.5)


KDPIPE = [sys.executable, "-m", "kdpipe"]


def cluster_env(ray_local, **extra: str) -> dict[str, str]:
    """A `kdpipe` subprocess joins the test session's Ray cluster as a driver of its own."""
    return dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, **extra)


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory) -> Path:
    """2,400 JPEGs in 8 classes sharded by the command line: 7 training shards of 300, 300, ..., 248 (an odd count
    and an uneven one) and 1 held-out shard. 2,048 training samples: 32 batches of 32 for each of 2 ranks."""
    from kdpipe.cli import main
    from kdpipe.data.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("jpeg-shards")
    write_image_folder(root / "images", classes=8, size=16, train_size=2048, val_size=352, seed=3)
    assert main(["data", "shard", str(root / "images"), str(root / "out"), *SHARD_ARGS]) == 0
    return root / "out"


SHARD_ARGS = ["--shard-size", "300", "--workers", "2"]


def tiny_job(root: Path, stages: list[dict], **data) -> dict:
    """A job on a small synthetic set whose stores all live under `root`."""
    return {
        "name": "tiny",
        "workdir": str(root / "out"),
        "data": {
            "source": "synthetic",
            "path": str(root / "data"),
            "train_size": 512,
            "val_size": 128,
            "shard_size": 128,
            "batch_size": 32,
            # Read in the training process: no loader worker processes to start (about 5 s per rank and stage
            # for the fork server); test_shard_reader and test_real_data cover loader workers.
            "loader_workers": 0,
            **data,
        },
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "tests"},
        "stages": stages,
    }


def teacher_batches(tracker, run_id: str) -> list[tuple[float, float]]:
    """Per epoch, the teacher batches a stage's ranks computed and read from the teacher-output cache."""
    history = tracker.metric_history(run_id, ["teacher_cache/computed", "teacher_cache/read"])
    pairs = zip(history["teacher_cache/computed"], history["teacher_cache/read"], strict=True)
    return [(computed, read) for (_, computed), (_, read) in pairs]


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
