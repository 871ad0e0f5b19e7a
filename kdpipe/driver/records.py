"""What the runner asks of the record of runs.

The runner decides from these answers alone (`kdpipe.driver.runner`): a finished run of a stage's fingerprint is
reused, an unfinished one is waited for (a living driver holds it) or resumed (it left a checkpoint), and a new run
is created held, or given up to a driver that created one first. `kdpipe.driver.mlflow_records` answers from the
MLflow store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Finished:
    run_id: str
    metrics: dict[str, float]
    chosen: dict = field(default_factory=dict)  # a searched stage: the values of the trial it holds


@dataclass(frozen=True)
class Unfinished:
    run_id: str
    holder: str  # the living driver that trains it, in words; "" when none does
    checkpointed: bool  # it holds a complete checkpoint to resume from


class StageRecords(Protocol):
    uri: str  # where workers log

    def start_job(self, name: str, spec: dict, settings: Sequence[str]) -> None: ...

    def finished(self, fingerprint: str) -> Finished | None:
        """The newest finished run of this fingerprint that holds final weights."""

    def unfinished(self, fingerprint: str) -> Unfinished | None:
        """The newest run of this fingerprint that never finished."""

    def holder(self, run_id: str) -> str:
        """The living driver that trains a run, in words; "" when none does. Raises `TrackingError` when the record
        cannot be read (the runner looks again at its next poll)."""

    def create(
        self, stage: str, fingerprint: str, config: dict, teacher_runs: dict[str, str], seed: int
    ) -> str | Unfinished:
        """A new run of the stage, held by this driver (its id); or, where another driver created one first, that
        run (and the new one is discarded)."""

    def take_over(self, run_id: str, stage: str) -> bool:
        """Hold an unfinished run to resume it; False when another driver took it at the same moment."""

    def artifact_uri(self, run_id: str) -> str: ...

    def store_init(self, run_id: str, weights: Path) -> None:
        """Put a stage's starting weights in its run, unless they are there already (a resumed run)."""

    def mark_reused(self, stage: str, run_id: str) -> None: ...

    def end(self, run_id: str, ok: bool) -> dict[str, float]:
        """End a stage run; its metrics, every epoch's included."""

    def publish(self, run_id: str, name: str | None) -> None:
        """A finished stage's weights as its run's model (once), and registered under `name` when given."""

    def renew(self, run_ids: list[str]) -> None:
        """Called on every poll with the runs this driver trains: their leases' heartbeat, when one is due."""

    def release(self, run_id: str) -> None: ...

    def end_job(self, title: str, results: list, baseline: str | None, drawn: bool, ok: bool) -> None:
        """The job's report into its job run, and the run's end."""
