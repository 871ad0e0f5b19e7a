"""Ray Train's `TorchTrainer` as kdpipe runs every stage and trial: without the Ray Data plumbing a run that
passes Ray no dataset never uses, and with a deadline on the placement of its workers.

Ray Train 2.60 starts a `DatasetManager` actor for every run, datasets or not (its `DatasetsCallback` creates one
as the worker group starts): one more process importing Ray Data beside each stage's start, where the cores are
already busy (`bench/step.py` measures it). kdpipe's workers read their own data (`kdpipe.data`), so a run
without Ray datasets swaps that callback for one that hands each worker no dataset shard provider and starts
nothing. The callback is Ray Train's internal API: `tests/test_pipeline.py` checks that a stage's run starts
Ray Train's workers and no `DatasetManager`, so a Ray release that changes it shows there.
"""

from __future__ import annotations

import time

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from kdpipe.driver.capacity import not_placed
from kdpipe.job.spec import WorkersSpec


class NoDatasets(DatasetsCallback):
    """`DatasetsCallback` for a run without Ray datasets: no `DatasetManager`, no Ray Data context to hand over."""

    def before_init_train_context(self, workers: list) -> dict[str, list]:
        return {"dataset_shard_provider": [None] * len(workers)}  # `ray.train.get_dataset_shard` is never called

    def after_worker_group_start(self, worker_group) -> None:
        pass


class PlacementDeadline(ControllerCallback, WorkerGroupCallback):
    """In the run's controller: workers not placed within `seconds` of the first attempt to start them (or to
    restart them after a failure) fail the run with `WorkersNotPlaced`.

    Ray Train waits for a worker group's placement group in attempts of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S and
    retries a timed-out attempt without end; every attempt begins with `on_controller_start_worker_group`, whose
    error is not one Ray Train retries. So the deadline holds to within one attempt."""

    def __init__(self, workers: WorkersSpec, seconds: float):
        self.workers, self.seconds, self.since = workers, seconds, None

    def on_controller_start_worker_group(self, *, scaling_config, num_workers: int) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        elif now - self.since > self.seconds:
            raise not_placed(self.workers, self.seconds)

    def after_worker_group_start(self, worker_group) -> None:
        self.since = None


class StageTrainer(TorchTrainer):
    """`TorchTrainer`, less the `DatasetManager` of a run given no Ray datasets, with a `PlacementDeadline`."""

    def __init__(self, *args, workers: WorkersSpec, deadline: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = PlacementDeadline(workers, deadline)

    def _create_default_callbacks(self) -> list:
        callbacks = [*super()._create_default_callbacks(), self.deadline]
        if self.datasets:
            return callbacks
        return [NoDatasets(self.train_run_context, {}) if type(c) is DatasetsCallback else c for c in callbacks]
