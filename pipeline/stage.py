"""The one training loop, run inside every Ray Train worker of a stage.

data (this rank's batches) -> method.forward_train -> DeepSpeed engine step -> evaluation over all ranks ->
`ray.train.report(metrics, checkpoint)`; rank 0 also logs each epoch to the stage's MLflow run and, at the end,
the final weights. Full checkpoints (`pipeline.checkpoint`) go to Ray Train and to MLflow at every epoch's end and
every `checkpoint.every_steps` steps or `every_minutes` minutes; a stage starts from the latest one it finds.
A speed or checkpoint fix made here holds for every method.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from pipeline.checkpoint import Position, read_position, read_state, write_state
from pipeline.data import PreparedData
from pipeline.data.loaders import open_data
from pipeline.methods import METHODS
from pipeline.models import build_model, load_weights, save_weights
from pipeline.progress import report_progress
from pipeline.spec import CheckpointSpec, DataSpec, OptimizerSpec, ScheduleSpec, StageSpec
from pipeline.tracking import TAG_CHECKPOINT, TAG_NODE, TAG_RESUMED, Tracker

PROBE_FILE, PROBE_SIZE = "probe.safetensors", 16
CLOCK_CHECK_STEPS = 10  # how often ranks agree on whether a time-based checkpoint is due (a small collective)
# NHWC inputs make convolutions run NHWC: about 25% faster on CPU (oneDNN), and the layout tensor cores want on
# GPU. Parameters stay in the default layout, which DeepSpeed's broadcast and ZeRO's flat buffers expect.
CHANNELS_LAST = torch.channels_last


@dataclass(frozen=True)
class TeacherRef:
    stage: str
    run_id: str  # the teacher stage's MLflow run, which holds its final weights


@dataclass(frozen=True)
class StageTask:
    """Everything a worker needs, as plain data Ray can ship to any node."""

    job: str
    config: dict  # the resolved stage config (spec fields with method params defaulted)
    data: PreparedData
    reading: DataSpec  # batch size, loader workers, augmentation
    teachers: tuple[TeacherRef, ...]
    tracking_uri: str
    run_id: str
    seed: int
    checkpoint: CheckpointSpec


def lr_factor(schedule: ScheduleSpec, epoch: float, epochs: int) -> float:
    """Multiplier of the base learning rate at fractional epoch `epoch`: a pure function of progress, so resuming
    needs no scheduler state."""
    warmup = min(1.0, epoch / schedule.warmup_epochs) if schedule.warmup_epochs else 1.0
    if schedule.name == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule.name == "step":
        return warmup * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    return warmup


def build_optimizer(spec: OptimizerSpec, parameters) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(
            parameters, spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=spec.weight_decay
        )
    optimizer = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return optimizer(parameters, spec.lr, weight_decay=spec.weight_decay)


def deepspeed_config(stage: StageSpec, batch_size: int, world: int) -> dict:
    ds = stage.deepspeed
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "train_batch_size": batch_size * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,  # our optimisers are plain torch ones, passed in
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 1 << 30,
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, dtype: torch.dtype, num_classes: int) -> dict:
    """Top-1/top-5 over the held-out split; each rank scores its own disjoint part and the counts are summed."""
    for buffer in model.buffers():  # every rank evaluates rank 0's BN statistics: the weights that get saved
        dist.broadcast(buffer, 0)
    k = min(5, num_classes)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in batches:
        logits = model(images.to(device, dtype, memory_format=CHANNELS_LAST))
        hits = logits.topk(k, 1).indices == labels.to(device)[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=device)])
    dist.all_reduce(totals)
    count = max(totals[2].item(), 1)
    return {"val/top1": totals[0].item() / count, f"val/top{k}": totals[1].item() / count}


def plot_method_metrics(tracker: Tracker, run_id: str, stage: StageSpec, current: dict[str, float]) -> None:
    """The method's per-epoch values (a schedule, learned weights) so far, as `plots/<method>.png` in the run."""
    if not current:
        return
    from pipeline.plots import plot_per_epoch  # matplotlib: only for the methods that plot

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{stage.method}.png"
        plot_per_epoch(tracker.metric_history(run_id, sorted(current)), f"{stage.name}: {stage.method}", path)
        tracker.log_artifact(run_id, path, "plots")


def all_ranks_sum(count: int, device: torch.device) -> int:
    total = torch.tensor(count, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total)


def load_teacher(tracker: Tracker, ref: TeacherRef, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A teacher stage's final weights, frozen and in eval mode (BN running statistics) from the start."""
    with tracker.downloaded_weights(ref.run_id) as folder:
        teacher = load_weights(folder)
    return teacher.to(device, dtype).eval().requires_grad_(False)


@torch.no_grad()
def log_teacher_probe(tracker: Tracker, run_id: str, refs, teachers: list[nn.Module], batches, device, dtype) -> None:
    """Record what each loaded teacher outputs on a fixed held-out batch: provenance a user (or a test) can check
    against the teacher stage's own saved weights."""
    images = next(iter(batches))[0][:PROBE_SIZE].to(device, dtype, memory_format=CHANNELS_LAST)
    probe = {"images": images.float().cpu().contiguous()}  # safetensors stores the default layout only
    probe.update({ref.stage: teacher(images).float().cpu() for ref, teacher in zip(refs, teachers, strict=True)})
    with tempfile.TemporaryDirectory() as folder:
        save_file(probe, str(Path(folder) / PROBE_FILE))
        tracker.log_artifact(run_id, Path(folder) / PROBE_FILE, "teachers")


class CheckpointClock:
    """When the next mid-epoch checkpoint is due, decided the same way on every rank (all of them must save)."""

    def __init__(self, spec: CheckpointSpec, global_step: int, device: torch.device):
        self.spec, self.device = spec, device
        self.saved(global_step)

    def saved(self, global_step: int) -> None:
        self.last_step, self.last_time = global_step, time.monotonic()

    def due(self, global_step: int) -> bool:
        if self.spec.every_steps and global_step - self.last_step >= self.spec.every_steps:
            return True
        if not self.spec.every_minutes or global_step % CLOCK_CHECK_STEPS:
            return False
        # Ranks' clocks differ; rank 0's decides, at a step every rank reaches.
        late = time.monotonic() - self.last_time >= 60 * self.spec.every_minutes
        flag = torch.tensor([int(late)], device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())


def restore(task: StageTask, tracker: Tracker, module: nn.Module, optimizer, rank: int, device) -> Position:
    """Where training starts: the newer of Ray Train's latest checkpoint of this run (a worker restart, or a rerun
    on the same storage) and the newest complete checkpoint in the stage's MLflow run (a rerun anywhere; or a
    restart whose last report Ray Train had not yet registered), else the beginning. Rank 0 chooses for all."""
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as local:
        choice: list = [None]
        if rank == 0:
            stored = tracker.checkpoints(task.run_id)
            newest_local = read_position(Path(local)).name if local else ""
            choice = [stored[-1] if stored and stored[-1] > newest_local else None]
        dist.broadcast_object_list(choice, 0)
        if choice[0] is not None:
            folder = tracker.download_checkpoint(task.run_id, choice[0], rank)
            position = read_state(folder, module, optimizer, rank, device)
            shutil.rmtree(folder)
            source = "MLflow artifact"
        elif local:
            position = read_state(Path(local), module, optimizer, rank, device)
            source = "Ray Train checkpoint"
        else:
            return Position(0, 0, 0)
    if rank == 0:
        tracker.set_tags(task.run_id, {TAG_RESUMED: f"{position.name} ({source})"})
    return position


def save_checkpoint(
    task: StageTask, tracker: Tracker, module: nn.Module, optimizer, position: Position, rank: int, metrics: dict
) -> None:
    """Every rank hands its part to Ray Train (one merged checkpoint folder), then to the stage's MLflow run:
    rank 0 uploads the position file last, after a barrier, so a checkpoint with one is complete."""
    with tempfile.TemporaryDirectory() as folder:
        files = write_state(Path(folder), module, optimizer, position, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        tracker.log_checkpoint(task.run_id, files[:1], position.name)
        dist.barrier()
        if rank == 0:
            tracker.log_checkpoint(task.run_id, files[1:], position.name)
            tracker.set_tags(task.run_id, {TAG_CHECKPOINT: position.name})
            tracker.prune_checkpoints(task.run_id, task.checkpoint.keep)


def stage_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`."""
    task: StageTask = config["task"]
    stage = StageSpec.model_validate(task.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(stage.deepspeed.precision, torch.float32)
    torch.manual_seed(task.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's too)
    tracker = Tracker(task.tracking_uri)
    tracker.set_tags(task.run_id, {f"{TAG_NODE}.{rank}": ray.get_runtime_context().get_node_id()})

    data = open_data(task.data, task.reading, task.seed, rank, world)
    method_cls = METHODS[stage.method]
    student = build_model(stage.model, data.num_classes)
    teachers = [load_teacher(tracker, ref, device, dtype) for ref in task.teachers]
    if rank == 0 and teachers:
        log_teacher_probe(tracker, task.run_id, task.teachers, teachers, data.val_batches(), device, dtype)
    params = method_cls.Params.model_validate(stage.params)
    setting = {"model": stage.model, "num_classes": data.num_classes, "image_size": task.reading.image_size}
    method = method_cls(student, teachers, params, **setting)
    optimizer = build_optimizer(stage.optimizer, [p for p in method.parameters() if p.requires_grad])
    engine, optimizer, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, config=deepspeed_config(stage, task.reading.batch_size, world)
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    position = restore(task, tracker, engine.module, optimizer, rank, device)
    clock = CheckpointClock(task.checkpoint, position.global_step, device)
    global_step = position.global_step

    for epoch in range(position.epoch, stage.epochs):
        started = time.perf_counter()
        engine.module.set_epoch(epoch)
        engine.train()
        steps = data.steps_per_epoch(epoch)
        first = position.step if epoch == position.epoch else 0
        sums: dict[str, torch.Tensor | float] = dict(position.sums) if first else {}
        for step, (images, labels) in enumerate(data.train_batches(epoch, first), first):
            factor = lr_factor(stage.schedule, epoch + step / steps, stage.epochs)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            _, losses = engine(images.to(device, dtype, memory_format=CHANNELS_LAST), labels.to(device))
            loss = sum(losses.values())
            engine.backward(loss)
            engine.step()
            global_step += 1
            for name, value in {"loss": loss, **losses}.items():  # summed on device: no sync per step
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if rank == 0 and step % 10 == 0:
                report_progress(
                    task.job,
                    stage.name,
                    epoch=epoch,
                    epochs=stage.epochs,
                    step=step,
                    steps=steps,
                    loss=float(loss),
                )
            if step + 1 < steps and clock.due(global_step):
                sums_now = {name: float(value) for name, value in sums.items()}
                position = Position(epoch, step + 1, global_step, sums_now)
                save_checkpoint(task, tracker, engine.module, optimizer, position, rank, {"global_step": global_step})
                clock.saved(global_step)
        engine.eval()
        metrics = {f"train/{name}": float(value) / max(steps, 1) for name, value in sums.items()}
        metrics.update(evaluate(engine.module.student, data.val_batches(), device, dtype, data.num_classes))
        for peer, (_, network) in engine.module.peers().items():
            scores = evaluate(network, data.val_batches(), device, dtype, data.num_classes)
            metrics.update({key.replace("val/", f"val/{peer}/"): value for key, value in scores.items()})
        method_values = engine.module.epoch_metrics()
        metrics.update(method_values)
        metrics["data/skipped"] = all_ranks_sum(data.skipped, device)
        end_lr = base_lrs[0] * lr_factor(stage.schedule, epoch + 1, stage.epochs)
        metrics.update({"lr": end_lr, "epoch_seconds": time.perf_counter() - started, "global_step": global_step})
        if rank == 0:
            tracker.log_metrics(task.run_id, metrics, step=epoch)
            plot_method_metrics(tracker, task.run_id, stage, method_values)
        position = Position(epoch + 1, 0, global_step)
        save_checkpoint(task, tracker, engine.module, optimizer, position, rank, {"epoch": epoch, **metrics})
        clock.saved(global_step)
        if rank == 0:
            top1 = metrics["val/top1"]
            report_progress(task.job, stage.name, epoch=epoch + 1, epochs=stage.epochs, step=0, steps=1, top1=top1)
    if rank == 0:  # after the loop: a stage resumed from its very last checkpoint still stores its weights
        networks = {"": (stage.model, engine.module.student), **engine.module.peers()}
        for peer, (model, network) in networks.items():
            with tempfile.TemporaryDirectory() as folder:
                save_weights(network, model, data.num_classes, Path(folder))
                tracker.log_weights(task.run_id, Path(folder), peer)
