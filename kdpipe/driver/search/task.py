"""A searched stage as plain data for Ray: what its trials, the scheduler and the record of the search share."""

from __future__ import annotations

from dataclasses import dataclass

from kdpipe.job.spec import CheckpointSpec, SearchSpec, WorkersSpec
from kdpipe.worker.task import StageTask

OBJECTIVE, EPOCHS_DONE = "objective", "epochs_done"  # what Tune sees: the search metric, and ASHA's clock


@dataclass(frozen=True)
class SearchTask:
    """A searched stage as plain data for Ray: the stage's own task (its run is the parent of the trials')."""

    stage: StageTask
    experiment_id: str
    workers: WorkersSpec
    storage: str
    checkpoint: CheckpointSpec
    deadline: float  # seconds each trial's workers may wait to be placed
    train_settings: dict[str, str]  # the driver's Ray Train settings, for each trial's Ray Train run
    at_once: int  # trials running at once (`kdpipe.driver.search.run.trials_at_once`)

    @property
    def spec(self) -> SearchSpec:
        return self.stage.stage.search

    @property
    def paths(self) -> list[str]:
        return list(self.spec.space)

    @property
    def epochs(self) -> int:
        return self.stage.stage.epochs


def with_objective(result: dict, metric: str, epochs_done: int) -> dict:
    return {**result, OBJECTIVE: result[metric], EPOCHS_DONE: epochs_done}
