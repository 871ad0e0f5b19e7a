"""What the driver hands a stage's workers: a typed task, plain data that Ray ships to any node.

The stage arrives validated, with its method's params resolved, as it runs (a repeat's name, a trial's values);
no worker parses a config again.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from kdpipe.data import PreparedData, decodes_on_cuda
from kdpipe.job.cache_policy import CacheSettings
from kdpipe.job.spec import CheckpointSpec, DataSpec, StageSpec
from kdpipe.models.inputs import ModelInput


@dataclass(frozen=True)
class TeacherRef:
    stage: str
    run_id: str  # the teacher stage's MLflow run, which holds its final weights
    artifact_uri: str  # that run's artifacts: workers download the weights without opening the tracking store


@dataclass(frozen=True)
class InitRef:
    """Where a stage's weights start: the state dict fitted to its model (`kdpipe.driver.imports`), in the stage
    run's `init/` folder (a search's trials read their stage's)."""

    artifact_uri: str
    fresh: tuple[str, ...] = ()  # keys that keep the model's own initialisation (a head for other classes)
    wanted: ModelInput | None = None  # an import's own input (`kdpipe.models.inputs`)


@dataclass(frozen=True)
class StageTask:
    job: str
    stage: StageSpec  # as it runs: a repeat's name, a trial's sampled values
    params: BaseModel  # the method's params, defaults filled in
    data: PreparedData
    reading: DataSpec  # batch size, loader workers, augmentation
    teachers: tuple[TeacherRef, ...]
    tracking_uri: str
    run_id: str
    artifact_uri: str  # the run's artifacts, which every rank writes its part of a checkpoint to
    seed: int
    checkpoint: CheckpointSpec
    cache: CacheSettings | None = None  # the teacher-output cache; None: the teachers run online
    init: InitRef | None = None  # None: random initial weights

    def cache_keys(self, world: int) -> list[str]:
        """Each teacher's key in the teacher-output cache for this stage on `world` ranks; none when it is off."""
        if self.cache is None:
            return []
        runs = [ref.run_id for ref in self.teachers]
        precision = self.stage.deepspeed.precision
        reading = self.reading.reading() | ({"decode": "cuda"} if decodes_on_cuda(self.reading) else {})
        return self.cache.keys(runs, self.data.identity, reading, self.seed, world, precision)
