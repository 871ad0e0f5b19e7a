"""What the driver hands a stage's workers: plain data that Ray ships to any node, and the functions they run.

The driver only names `run_stage` and `fill_cache`: Ray pickles them by reference, so the driver never imports the
training stack (DeepSpeed, torchvision, the readers: seconds of imports) that only the workers need.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data import PreparedData
from pipeline.spec import CheckpointSpec, DataSpec
from pipeline.startup import collector_paused


@dataclass(frozen=True)
class TeacherRef:
    stage: str
    run_id: str  # the teacher stage's MLflow run, which holds its final weights
    artifact_uri: str  # that run's artifacts: workers download the weights without opening the tracking store


@dataclass(frozen=True)
class StageTask:
    job: str
    config: dict  # the resolved stage config (spec fields with method params defaulted)
    data: PreparedData
    reading: DataSpec  # batch size, loader workers, augmentation
    teachers: tuple[TeacherRef, ...]
    tracking_uri: str
    run_id: str
    artifact_uri: str  # the run's artifacts, which every rank writes its part of a checkpoint to
    seed: int
    checkpoint: CheckpointSpec
    teacher_cache: str = ""  # the teacher-output cache's root folder or URL; empty: the teachers run online
    teacher_cache_top_k: int = 0  # logits the cache keeps per image (FKD's soft labels); 0: all of them

    def teacher_cache_keys(self, world: int) -> list[str]:
        """Each teacher's key in the teacher-output cache for this stage on `world` ranks; none when it is off."""
        from pipeline.plan import reading_settings
        from pipeline.teacher_cache import cache_key

        if not self.teacher_cache:
            return []
        reading, precision = reading_settings(self.reading), self.config["deepspeed"]["precision"]
        encoding = f"top{self.teacher_cache_top_k}" if self.teacher_cache_top_k else "fp16"
        data, seed = self.data.identity, self.seed
        return [cache_key(ref.run_id, data, reading, seed, world, precision, encoding) for ref in self.teachers]


def fill_cache(task: StageTask, rank: int, world: int) -> dict[str, float]:
    """A Ray task: fill the teacher-output cache for one rank's views of the stage (`pipeline.stage`)."""
    with collector_paused():
        from pipeline.stage import fill_teacher_cache
    return fill_teacher_cache(task, rank, world)


def run_stage(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: the stage's loop, imported in the worker."""
    with collector_paused():  # the training stack: most of what a stage adds to Ray Train's own start
        from pipeline.stage import stage_loop
    stage_loop(config)
