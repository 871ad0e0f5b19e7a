"""The training engine: a method in a DeepSpeed engine, its step, the learning rate at each step, evaluation, and the
epoch loop that ties them together. No Ray, no MLflow.

It runs wherever a `torch.distributed` group exists: in every rank of a Ray Train stage, or in one plain process
(`single_process_group`: world size 1, which needs no collectives). What happens around the loop comes in through
three small interfaces the caller hands over: a `CheckpointSink` (when and where to save), an `EpochLog` (where
an epoch's metrics go) and a `Progress` reporter; and, where teachers answer from the teacher-output cache, the
`TeacherCaches` to tell each epoch and step. A speed fix made here holds for every method and every stage,
and is measured in one process by `bench/step.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime import torch_autocast
from torch import nn

from kdpipe.job.spec import OptimizerSpec, ScheduleSpec, StageSpec
from kdpipe.methods.base import Method
from kdpipe.worker.checkpoint import Position
from kdpipe.worker.teacher_cache import TeacherCaches

if TYPE_CHECKING:
    from kdpipe.data.loaders import StageData

# DeepSpeed's CPU backend compiles (about a minute in a new virtualenv), then loads in every process, a shared-memory
# all-reduce that serves tensor-parallel inference alone (`inference_all_reduce`); training's collectives go through
# torch.distributed. Its table of compatible ops, recorded empty before DeepSpeed first probes every op for it,
# skips the probe, the build and the load: DeepSpeed then uses gloo alone, as on platforms without the op.
deepspeed.ops.__compatible_ops__ = {}

# A stage's precision is the dtype its convolutions and matrix products run in, under autocast (DeepSpeed's
# `torch_autocast`): parameters, BatchNorm and the optimizer stay fp32, and softmax and the losses run in fp32 as
# autocast's lists say. DeepSpeed's own bf16/fp16 modes cast every parameter instead: BatchNorm then falls off
# cuDNN (far slower than the bare loop on a GPU, bench/results/) and fp16 BatchNorm does not learn at all.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOP1 = "val/top1"  # the held-out metric stages are compared by


@contextlib.contextmanager
def compiling_nothing() -> Iterator[None]:
    """Dynamo switched off inside the block. ZeRO's check of an engine's optimizer imports DeepSpeed's Muon
    optimizer, whose kernels carry `@torch.compile`: that decorator alone imports inductor's compiler, seconds in
    each training process. kdpipe compiles nothing, so the engine is built with dynamo off, and the decorators hand the
    kernels back as they are (Muon is never run)."""
    saved = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by torch.compile at each call
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = saved


class CheckpointSink(Protocol):
    """Where the full training state goes; every rank calls both methods at the same steps."""

    def due(self, global_step: int) -> bool: ...

    def save(self, position: Position, metrics: dict[str, float]) -> None: ...


class EpochLog(Protocol):
    def log_epoch(self, epoch: int, metrics: dict[str, float], method_values: dict[str, float]) -> None: ...


class Progress(Protocol):
    def step(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> None: ...

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


def lr_factor(schedule: ScheduleSpec, epoch: float, epochs: int) -> float:
    """Multiplier of the base learning rate at fractional epoch `epoch`: a pure function of progress, so resuming
    needs no scheduler state."""
    warmup = min(1.0, epoch / schedule.warmup_epochs) if schedule.warmup_epochs else 1.0
    if schedule.name == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule.name == "step":
        return warmup * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    return warmup


def build_optimizer(spec: OptimizerSpec, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
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
        "torch_autocast": {"enabled": ds.precision != "fp32", "dtype": ds.precision},  # DeepSpeed reads fp32/bf16/fp16
        "steps_per_print": 1 << 30,
    }


def single_process_group(device: torch.device) -> None:
    """A process group of one (an in-memory store, no network) for DeepSpeed in a plain process: tests, benches,
    one GPU. DeepSpeed needs a group and LOCAL_RANK even when there is nobody to talk to."""
    if dist.is_initialized():
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Compute in `dtype` where autocast allows it, as DeepSpeed's forward does; fp32 turns it off."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every rank, in place; a process on its own has nothing to add."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


@torch.no_grad()
def evaluate(model: nn.Module, data: StageData, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Top-1/top-k over the held-out split; each rank scores its own disjoint part and the counts are summed."""
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank evaluates rank 0's BN statistics: the
        for buffer in model.buffers():  # weights that get saved
            dist.broadcast(buffer, 0)
    k = min(5, data.num_classes)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in data.val_batches():
        with autocast(device, dtype):
            logits = model(data.inputs(images, device))
        hits = logits.topk(k, 1).indices == labels.to(device)[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=device)])
    top1, topk, count = sum_over_ranks(totals).tolist()
    return {TOP1: top1 / max(count, 1), f"val/top{k}": topk / max(count, 1)}


class Engine:
    """One stage's DeepSpeed engine around its method, on `device`, in the stage's precision."""

    def __init__(self, method: Method, stage: StageSpec, batch_size: int, device: torch.device):
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.device, self.dtype = device, PRECISIONS[stage.deepspeed.precision]
        self.batch_size, self.epochs, self.schedule = batch_size, stage.epochs, stage.schedule
        optimizer = build_optimizer(stage.optimizer, [p for p in method.parameters() if p.requires_grad])
        # DeepSpeed keeps the autocast setting of the last engine it built in module globals, which ZeRO's
        # optimizer reads (after an fp16 engine it scales the loss): each engine in a process starts from its own.
        torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None
        with compiling_nothing():
            self.ds, self.optimizer, _, _ = deepspeed.initialize(
                model=method, optimizer=optimizer, config=deepspeed_config(stage, batch_size, self.world)
            )
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]

    @property
    def method(self) -> Method:
        return self.ds.module

    def set_lr(self, epoch: float) -> float:
        """The learning rate at fractional epoch `epoch`, set on every parameter group; returns the factor."""
        factor = lr_factor(self.schedule, epoch, self.epochs)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return factor

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on model inputs already on the device (`StageData.inputs`): forward through the
        method, DeepSpeed backward and step. Returns the detached losses (their sum as `loss`), left on the device:
        reading them would wait for the step to finish."""
        _, losses = self.ds(inputs, labels.to(self.device, non_blocking=True))
        loss = sum(losses.values())
        self.ds.backward(loss)
        self.ds.step()
        return {"loss": loss.detach().float(), **{name: value.detach().float() for name, value in losses.items()}}

    def evaluate_all(self, data: StageData) -> dict[str, float]:
        """The student's scores, and each peer's under `val/<peer>/`."""
        metrics = evaluate(self.method.student, data, self.device, self.dtype)
        for peer, (_, network) in self.method.peers().items():
            scores = evaluate(network, data, self.device, self.dtype)
            metrics.update({key.replace("val/", f"val/{peer}/"): value for key, value in scores.items()})
        return metrics

    def train_epoch(
        self, data: StageData, at: Position, sink: CheckpointSink, progress: Progress, teachers: TeacherCaches
    ) -> tuple[Position, dict[str, float]]:
        """The steps of epoch `at.epoch` from step `at.step` on; a mid-epoch checkpoint whenever the sink says one
        is due. Returns the position at the epoch's end, the epoch's mean training losses and, with cached
        teachers, the teacher batches they computed and read (summed over ranks)."""
        epoch, steps = at.epoch, data.steps_per_epoch(at.epoch)
        self.method.set_epoch(epoch)
        self.ds.train()
        sums: dict[str, torch.Tensor | float] = dict(at.sums)  # summed on the device: no sync per step
        global_step = at.global_step
        teachers.begin_epoch(epoch, steps)
        for step, (images, labels) in enumerate(data.train_batches(epoch, at.step), at.step):
            teachers.at_step(step)
            self.set_lr(epoch + step / steps)
            losses = self.step(data.inputs(images, self.device), labels)
            global_step += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value
            progress.step(epoch, step, steps, losses["loss"])
            if step + 1 < steps and sink.due(global_step):
                position = Position(epoch, step + 1, global_step, {name: float(v) for name, v in sums.items()})
                sink.save(position, {"global_step": global_step})
        means = {f"train/{name}": float(value) / max(steps, 1) for name, value in sums.items()}
        counts = teachers.end_epoch()
        if counts:
            totals = torch.tensor(list(counts.values()), dtype=torch.float64, device=self.device)
            means.update(zip(counts, sum_over_ranks(totals).tolist(), strict=True))
        return Position(epoch + 1, 0, global_step), means

    def train(
        self,
        data: StageData,
        start: Position,
        sink: CheckpointSink,
        log: EpochLog,
        progress: Progress,
        teachers: TeacherCaches | None = None,
    ) -> Position:
        """Every epoch from `start` to the last: train, evaluate, log, checkpoint at the epoch's end."""
        position, teachers = start, teachers or TeacherCaches([])
        while position.epoch < self.epochs:
            epoch, started = position.epoch, time.perf_counter()
            first = position.step
            position, metrics = self.train_epoch(data, position, sink, progress, teachers)
            trained = time.perf_counter() - started
            self.ds.eval()
            metrics.update(self.evaluate_all(data))
            method_values = self.method.epoch_metrics()
            metrics.update(method_values)
            skipped = torch.tensor(float(data.skipped), device=self.device)
            images = (data.steps_per_epoch(epoch) - first) * self.batch_size * self.world
            metrics.update(
                {
                    "data/skipped": sum_over_ranks(skipped).item(),
                    "lr": self.base_lrs[0] * lr_factor(self.schedule, epoch + 1, self.epochs),
                    "train_seconds": trained,
                    "images_per_second": images / max(trained, 1e-9),
                    "epoch_seconds": time.perf_counter() - started,
                    "global_step": position.global_step,
                }
            )
            log.log_epoch(epoch, metrics, method_values)
            sink.save(position, {"epoch": epoch, **metrics})
            progress.epoch_end(epoch, metrics)
        return position
