"""A stage inside each Ray Train worker: the glue that hands the engine its data, a checkpoint sink, an epoch log
and a progress reporter.

    data (this rank's reader) ─┐
    teachers (MLflow weights,  ─┼─> method -> Engine.train(data, start, sink, log, progress, caches) -> weights
      behind their cache)       │
    restore (Ray Train/MLflow) ─┘

The sink writes each checkpoint once as a folder and hands it both to Ray Train (`ray.train.report`: worker
restarts) and to the stage's MLflow run (a later `kdpipe run` anywhere); rank 0 logs each epoch's metrics and the
method's plot, and reports progress to the driver's board. Every rank moves files through the run's artifact URI
(`RunArtifacts`); rank 0 alone logs metrics and tags, through the job's tracking actor (the store the driver
opened once).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline import artifacts
from pipeline.checkpoint import (
    MODEL,
    POSITION,
    CheckpointClock,
    Position,
    rank_file,
    read_position,
    read_state,
    write_state,
)
from pipeline.data.loaders import StageData, open_data
from pipeline.engine import PRECISIONS, Engine, autocast
from pipeline.methods import METHODS
from pipeline.models import build_model, load_weights, save_weights
from pipeline.progress import report_progress
from pipeline.spec import StageSpec
from pipeline.task import StageTask, TeacherRef
from pipeline.teacher_cache import CachedTeacher, Exact, TeacherCache, TeacherCaches, TopK
from pipeline.tracking import TAG_CHECKPOINT, TAG_NODE, TAG_RESUMED, RunArtifacts
from pipeline.tracking_actor import ActorTracker

PROBE_SIZE = 16
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
            from pipeline.plots import plot_per_epoch  # matplotlib: only for the methods that plot

            history = self.tracker.metric_history(self.run_id, sorted(method_values))
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"{self.stage.method}.png"
                plot_per_epoch(history, f"{self.stage.name}: {self.stage.method}", path)
                self.files.log_files([path], artifacts.PLOTS)


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
            report_progress(self.job, self.stage.name, top1=metrics["val/top1"], **fields)


def load_teacher(ref: TeacherRef, tracking_uri: str, device: torch.device) -> nn.Module:
    """A teacher stage's final weights, frozen and in eval mode (BN running statistics) from the start; fp32, run
    under the stage's autocast like the student."""
    with RunArtifacts(ref.artifact_uri, tracking_uri).downloaded(artifacts.WEIGHTS) as folder:
        teacher = load_weights(folder)
    return teacher.to(device).eval().requires_grad_(False)


def cached_teachers(
    task: StageTask, teachers: list[nn.Module], rank: int, world: int, classes: int
) -> list[CachedTeacher]:
    """The teachers behind the teacher-output cache, when the stage uses one (`task.teacher_cache`); else none."""
    if not task.teacher_cache:
        return []
    k = task.teacher_cache_top_k
    encoding = TopK(k, classes) if 0 < k < classes else Exact()
    caches = [TeacherCache(task.teacher_cache, key, rank, encoding) for key in task.teacher_cache_keys(world)]
    return [CachedTeacher(teacher, cache) for teacher, cache in zip(teachers, caches, strict=True)]


@torch.no_grad()
def log_teacher_probe(
    files: RunArtifacts, task: StageTask, teachers: list[nn.Module], data: StageData, device: torch.device
) -> None:
    """Record what each loaded teacher outputs on a fixed held-out batch: provenance a user (or a test) can check
    against the teacher stage's own saved weights."""
    images = data.inputs(next(iter(data.val_batches()))[0][:PROBE_SIZE], device)
    probe = {"images": images.float().cpu().contiguous()}  # safetensors stores the default layout only
    probe.update({ref.stage: t(images).float().cpu() for ref, t in zip(task.teachers, teachers, strict=True)})
    with tempfile.TemporaryDirectory() as folder:
        save_file(probe, str(Path(folder) / artifacts.PROBE_FILE))
        files.log_files([Path(folder) / artifacts.PROBE_FILE], artifacts.TEACHERS)


def save_final_weights(files: RunArtifacts, stage: StageSpec, engine: Engine, num_classes: int) -> None:
    """The student's weights, and each peer's: safetensors and the facts needed to rebuild the module."""
    networks = {"": (stage.model, engine.method.student), **engine.method.peers()}
    for peer, (model, network) in networks.items():
        with tempfile.TemporaryDirectory() as folder:
            save_weights(network, model, num_classes, Path(folder))
            files.log_folder(Path(folder), artifacts.weights_folder(peer))


def stage_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`."""
    task: StageTask = config["task"]
    stage = StageSpec.model_validate(task.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(task.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's too)
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    files, tracker = RunArtifacts(task.artifact_uri, task.tracking_uri), None
    if rank == 0:
        tracker = ActorTracker(task.job)
        tracker.set_tags(task.run_id, {f"{TAG_NODE}.{r}": node for r, node in enumerate(nodes)})

    data = open_data(task.data, task.reading, task.seed, rank, world, pin_memory=device.type == "cuda")
    student = build_model(stage.model, data.num_classes)  # first: its initial weights depend on the seed alone
    teachers = [load_teacher(ref, task.tracking_uri, device) for ref in task.teachers]
    cached = cached_teachers(task, teachers, rank, world, data.num_classes)
    method_cls = METHODS[stage.method]
    setting = {"model": stage.model, "num_classes": data.num_classes, "image_size": task.reading.image_size}
    method = method_cls(student, cached or teachers, method_cls.Params.model_validate(stage.params), **setting)
    engine = Engine(method, stage, task.reading.batch_size, device)
    if rank == 0 and teachers:
        log_teacher_probe(files, task, teachers, data, device)
    sink = StageCheckpoints(task, files, tracker, engine)
    start = sink.restore()
    log, progress = RunLog(tracker, files, task.run_id, stage), BoardProgress(task.job, stage, rank)
    engine.train(data, start, sink, log, progress, TeacherCaches(cached))
    if rank == 0:  # after the loop: a stage resumed from its very last checkpoint still stores its weights
        save_final_weights(files, stage, engine, data.num_classes)


@torch.inference_mode()
def fill_teacher_cache(task: StageTask, rank: int, world: int) -> dict[str, float]:
    """Run rank `rank`'s teachers over every view that rank trains on in all the stage's epochs, filling the
    teacher-output cache (a plain Ray task, ahead of a search's trials). Returns the teacher batches computed and
    read."""
    stage = StageSpec.model_validate(task.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray shows a task its own GPUs only
    dtype = PRECISIONS[stage.deepspeed.precision]
    data = open_data(task.data, task.reading, task.seed, rank, world, pin_memory=device.type == "cuda")
    teachers = [load_teacher(ref, task.tracking_uri, device) for ref in task.teachers]
    caches = TeacherCaches(cached_teachers(task, teachers, rank, world, data.num_classes))
    counts: dict[str, float] = {}
    for epoch in range(stage.epochs):
        caches.begin_epoch(epoch, data.steps_per_epoch(epoch))
        for step, (images, _) in enumerate(data.train_batches(epoch)):
            caches.at_step(step)
            inputs = data.inputs(images, device)  # exactly as the engine hands them to the method
            with autocast(device, dtype):
                for teacher in caches.teachers:
                    teacher(inputs)
        for name, value in caches.end_epoch().items():
            counts[name] = counts.get(name, 0.0) + value
    return counts
