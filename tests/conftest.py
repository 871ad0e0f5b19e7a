"""Shared fixtures: one real local Ray instance for the whole session, and job files written into tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_MNIST = SHARED_DATA / "fashion-mnist"


@pytest.fixture(scope="session")
def process_group():
    """This process as a torch.distributed group of one, as the engine runs outside Ray (no network, no peers)."""
    import torch

    from pipeline.engine import single_process_group

    single_process_group(torch.device("cpu"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # The dashboard serves the State API, which Ray Train's placement-group cleaner needs in a search.
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


# A teacher -> assistant -> student chain on small synthetic data; the assistant runs ZeRO-2 (its optimizer state
# is partitioned over the 2 ranks), which makes it the stage whose interruption and resumption matter most.
CHAIN = [
    {"name": "teacher", "model": "resnet8", "epochs": 3, "optimizer": {"lr": 0.1}},
    {
        "name": "assistant",
        "model": "resnet8",
        "teachers": ["teacher"],
        "method": "kd",
        "epochs": 3,
        "deepspeed": {"zero_stage": 2},
    },
    {"name": "student", "model": "resnet8", "teachers": ["assistant"], "method": "kd", "epochs": 1},
]
CHAIN_DATA = {"train_size": 512, "val_size": 128}
CHAIN_STEPS_PER_EPOCH = 512 // 2 // 32  # train_size / workers / batch_size


@pytest.fixture(scope="session")
def finished_chain(ray_local, tmp_path_factory):
    """The chain, run once without interruption: what test_pipeline checks, and the reference a resumed run of
    the same job (test_resume) must match."""
    from pipeline.plan import load_plan
    from pipeline.runner import run_job

    root = tmp_path_factory.mktemp("chain")
    plan = load_plan(write_job(root / "job.yaml", tiny_job(root, CHAIN, **CHAIN_DATA)))
    return root, plan, run_job(plan)


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory) -> Path:
    """2,400 JPEGs in 8 classes sharded by the command line: 7 training shards of 300, 300, ..., 248 (an odd count
    and an uneven one) and 1 held-out shard. 2,048 training samples: 32 batches of 32 for each of 2 ranks."""
    from pipeline.cli import main
    from pipeline.data.synthetic import write_image_folder

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


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
