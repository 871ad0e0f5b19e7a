"""What the driver hands a stage's workers: plain data that Ray ships to any node, and the function they run.

The driver only names `run_stage`: Ray pickles it by reference, so the driver never imports the training stack
(DeepSpeed, torchvision, the readers: seconds of imports) that only the workers need.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data import PreparedData
from pipeline.spec import CheckpointSpec, DataSpec


@dataclass(frozen=True)
class TeacherRef:
    stage: str
    run_id: str  # the teacher stage's MLflow run, which holds its final weights


@dataclass(frozen=True)
class StageTask:
    job: str
    config: dict  # the resolved stage config (spec fields with method params defaulted)
    data: PreparedData
    reading: DataSpec  # batch size, loader workers, augmentation
    teachers: tuple[TeacherRef, ...]
    tracking_uri: str
    run_id: str
    seed: int
    checkpoint: CheckpointSpec


def run_stage(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: the stage's loop, imported in the worker."""
    from pipeline.stage import stage_loop

    stage_loop(config)
