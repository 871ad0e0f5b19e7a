"""Shared fixtures: one real local Ray instance for the whole session, and job files written into tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_MNIST = SHARED_DATA / "fashion-mnist"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


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
            **data,
        },
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "tests"},
        "stages": stages,
    }


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
