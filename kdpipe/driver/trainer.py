"""Ray Train's `TorchTrainer` as kdpipe runs every stage and trial: without the Ray Data plumbing a run that
passes Ray no dataset never uses.

Ray Train 2.60 starts a `DatasetManager` actor for every run, datasets or not (its `DatasetsCallback` creates one
as the worker group starts): one more process importing Ray Data beside each stage's start, where the cores are
already busy (`bench/step.py` measures it). kdpipe's workers read their own data (`kdpipe.data`), so a run
without Ray datasets swaps that callback for one that hands each worker no dataset shard provider and starts
nothing. The callback is Ray Train's internal API: `tests/test_pipeline.py` checks that a stage's run starts
Ray Train's workers and no `DatasetManager`, so a Ray release that changes it shows there.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback


class NoDatasets(DatasetsCallback):
    """`DatasetsCallback` for a run without Ray datasets: no `DatasetManager`, no Ray Data context to hand over."""

    def before_init_train_context(self, workers: list) -> dict[str, list]:
        return {"dataset_shard_provider": [None] * len(workers)}  # `ray.train.get_dataset_shard` is never called

    def after_worker_group_start(self, worker_group) -> None:
        pass


class StageTrainer(TorchTrainer):
    """`TorchTrainer`, less the `DatasetManager` of a run given no Ray datasets."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [NoDatasets(self.train_run_context, {}) if type(c) is DatasetsCallback else c for c in callbacks]
