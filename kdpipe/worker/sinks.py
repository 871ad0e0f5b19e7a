"""What the engine reports to, inside a stage's worker: its checkpoint sink (Ray Train and the stage's MLflow run),
its epoch log (rank 0's metrics and the method's plot) and its progress reporter (the driver's board).

The sink writes each checkpoint once as a folder and hands it both to Ray Train (`ray.train.report`: worker
restarts) and to the stage's MLflow run (a later `kdpipe run` anywhere). Every rank moves files through the run's
artifact URI (`RunArtifacts`); rank 0 alone logs metrics and tags, through the job's tracking actor.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray.train
import torch

from kdpipe.job.spec import StageSpec
from kdpipe.tracking.files import RunArtifacts
from kdpipe.tracking.tags import TAG_CHECKPOINT, TAG_RESUMED
from kdpipe.worker import artifacts
from kdpipe.worker.checkpoint import (
    MODEL,
    POSITION,
    CheckpointClock,
    Position,
    rank_file,
    read_position,
    read_state,
    write_state,
)
from kdpipe.worker.engine import TOP1, Engine
from kdpipe.worker.progress import report_progress
from kdpipe.worker.task import StageTask
from kdpipe.worker.tracking_actor import ActorTracker

PROGRESS_EVERY = 10  # steps between progress reports (each reads the loss: a device sync)


class StageCheckpoints:
    """The engine's checkpoint sink: Ray Train and the stage's MLflow run (`tracker`: rank 0's, None elsewhere)."""

    def __init__(self, task: StageTask, files: RunArtifacts, tracker: ActorTracker | None, engine: Engine):
        self.task, self.files, self.tracker, self.engine = task, files, tracker, engine
        self.clock = CheckpointClock(task.checkpoint, 0, engine.device)

    def due(self, global_step: int) -> bool:
        return self.clock.due(global_step)

    def save(self, position: Position, metrics: dict[str, float]) -> None:
        """Every rank hands its part to Ray Train (one merged checkpoint folder), then to the MLflow run: rank 0
        uploads the position file last, after a barrier, so a checkpoint with one is complete, and Ray Train holds it
        too: a restart or a rerun on the same storage never has to fall back to an older one."""
        rank, folder = self.engine.rank, artifacts.checkpoint_folder(position.name)
        with tempfile.TemporaryDirectory() as local:
            written = write_state(Path(local), self.engine.method, self.engine.optimizer, position, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local))
            # A worker's report queue holds one report: this empty one waits until Ray Train's controller took the
            # checkpoint's. Without it, a rank failing right after (an MLflow outage, a kill) could end the worker
            # group before every rank's report was taken, and Ray Train would drop the checkpoint.
            ray.train.report({})
            self.files.log_files(written[:1], folder)
            torch.distributed.barrier()
            if self.tracker is not None:
                self.files.log_files(written[1:], folder)
                self.tracker.set_tags(self.task.run_id, {TAG_CHECKPOINT: position.name})
                artifacts.prune_checkpoints(self.files, self.task.checkpoint.keep)
        self.clock.saved(position.global_step)

    def restore(self) -> Position:
        """Where training starts: the newer of Ray Train's latest checkpoint of this run (a worker restart, or a
        rerun on the same storage) and the newest complete checkpoint in the stage's MLflow run (a rerun anywhere),
        else the beginning. Rank 0 chooses."""
        engine = self.engine
        checkpoint = ray.train.get_checkpoint()
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as local:
            choice: list = [None]
            if engine.rank == 0:
                stored = artifacts.stored_checkpoints(self.files)
                newest_local = read_position(Path(local)).name if local else ""
                choice = [stored[-1] if stored and stored[-1] > newest_local else None]
            torch.distributed.broadcast_object_list(choice, 0)
            if choice[0] is not None:
                names = [POSITION, MODEL, rank_file(engine.rank)]
                with self.files.downloaded(artifacts.checkpoint_folder(choice[0]), names) as folder:
                    position = read_state(folder, engine.method, engine.optimizer, engine.rank, engine.device)
                source = "MLflow artifact"
            elif local:
                position = read_state(Path(local), engine.method, engine.optimizer, engine.rank, engine.device)
                source = "Ray Train checkpoint"
            else:
                return Position(0, 0, 0)
        if self.tracker is not None:
            self.tracker.set_tags(self.task.run_id, {TAG_RESUMED: f"{position.name} ({source})"})
        self.clock.saved(position.global_step)
        return position


class RunLog:
    """The engine's epoch log: rank 0 writes each epoch's metrics to the MLflow run, and the method's per-epoch
    values (a schedule, learned weights) so far as `plots/<method>.png` (`tracker`: rank 0's, None elsewhere)."""

    def __init__(self, tracker: ActorTracker | None, files: RunArtifacts, run_id: str, stage: StageSpec):
        self.tracker, self.files, self.run_id, self.stage = tracker, files, run_id, stage

    def log_epoch(self, epoch: int, metrics: dict[str, float], method_values: dict[str, float]) -> None:
        if self.tracker is None:
            return
        self.tracker.log_metrics(self.run_id, metrics, step=epoch)
        if method_values:
            from kdpipe.plots import plot_per_epoch  # matplotlib: only for the methods that plot

            history = self.tracker.metric_history(self.run_id, sorted(method_values))
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"{self.stage.method}.png"
                plot_per_epoch(history, f"{self.stage.name}: {self.stage.method}", path)
                self.files.log_files([path], artifacts.PLOTS)


class BestEpoch:
    """`result: best`: around the epoch log, rank 0 keeps the student's weights of its best epoch so far by
    `val/top1` in the run (`best/`), and the epoch as the metric `best_epoch`. Both live in the run, so a resumed
    stage compares against the epochs it trained before; a tie keeps the earlier epoch."""

    def __init__(self, log: RunLog, save: Callable[[], None]):
        self.log, self.save, self.best = log, save, None

    def log_epoch(self, epoch: int, metrics: dict[str, float], method_values: dict[str, float]) -> None:
        self.log.log_epoch(epoch, metrics, method_values)
        tracker = self.log.tracker
        if tracker is None:
            return
        if self.best is None:
            history = tracker.metric_history(self.log.run_id, [TOP1])[TOP1]
            self.best = max((value for step, value in history if step < epoch), default=-1.0)
        if metrics[TOP1] > self.best:
            self.best = metrics[TOP1]
            self.save()
            tracker.log_metrics(self.log.run_id, {"best_epoch": epoch}, step=epoch)


class BoardProgress:
    """The engine's progress reporter: rank 0 tells the driver's progress board (fire and forget)."""

    def __init__(self, job: str, stage: StageSpec, rank: int):
        self.job, self.stage, self.rank = job, stage, rank

    def step(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> None:
        if self.rank == 0 and step % PROGRESS_EVERY == 0:
            fields = {"epoch": epoch, "epochs": self.stage.epochs, "step": step, "steps": steps}
            report_progress(self.job, self.stage.name, loss=float(loss), **fields)

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            fields = {"epoch": epoch + 1, "epochs": self.stage.epochs, "step": 0, "steps": 1}
            report_progress(self.job, self.stage.name, top1=metrics[TOP1], **fields)
