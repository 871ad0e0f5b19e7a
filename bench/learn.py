"""Does a stage learn in each precision? A teacher trained from labels, then a student distilled from it (KD), each
through kdpipe's engine in one process (no Ray, no MLflow), on Fashion-MNIST read by kdpipe's own reader and
scored on its 10,000 test images. On a GPU the engine's process group is NCCL's.

This is the run that checks bf16 and fp16 where Ray cannot go (a GPU machine without Ray's wheels): the same
`Engine.train` every Ray Train worker runs, fed by the same `open_data`, with a checkpoint sink that saves nothing.

    .venv/bin/python bench/learn.py --precision fp32 bf16 --epochs 1 --train-subset 4000   # CPU, a minute
    python bench/learn.py --device cuda --precision bf16 fp16 --teacher resnet50 --student resnet18 --size 64

Prints, per precision and stage, each epoch's mean training loss, test top-1 and images/s, whether every step's
loss was finite, and the student's top-1 beside chance (0.10).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kdpipe.data import prepare_data
from kdpipe.data.loaders import StageData, open_data
from kdpipe.job.spec import DataSpec, StageSpec
from kdpipe.methods import METHODS
from kdpipe.models import build_model
from kdpipe.worker.checkpoint import Position
from kdpipe.worker.engine import PRECISIONS, Engine, single_process_group

FASHION_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"


class Watch:
    """Checkpoint sink (saves nothing), epoch log and progress reporter: prints each epoch and keeps, on the device,
    whether every step's loss was finite (reading it each step would wait for the step)."""

    def __init__(self, label: str, device: torch.device):
        self.label, self.finite = label, torch.ones((), dtype=torch.bool, device=device)
        self.epochs: list[dict[str, float]] = []

    def due(self, global_step: int) -> bool:
        return False

    def save(self, position: Position, metrics: dict[str, float]) -> None:
        pass

    def log_epoch(self, epoch: int, metrics: dict[str, float], method_values: dict[str, float]) -> None:
        self.epochs.append(metrics)
        print(
            f"  {self.label:28s} epoch {epoch}: train loss {metrics['train/loss']:7.4f}   "
            f"test top-1 {metrics['val/top1']:.3f}   {metrics['images_per_second']:8.0f} images/s",
            flush=True,
        )

    def step(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> None:
        self.finite &= torch.isfinite(loss)

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass


def train_stage(
    args: argparse.Namespace, data: StageData, model: str, method: str, teachers: list, precision: str, label: str
) -> tuple[torch.nn.Module, Watch]:
    torch.manual_seed(0)
    stage = StageSpec(
        name=method,
        model=model,
        method=method,
        teachers=["teacher"] * len(teachers),
        epochs=args.epochs,
        optimizer={"lr": args.lr},
        deepspeed={"precision": precision},
        workers={"gpus": 1 if args.device == "cuda" else 0},
    )
    cls = METHODS[method]
    setting = {"model": model, "num_classes": data.num_classes, "image_size": args.size}
    module = cls(build_model(model, data.num_classes), teachers, cls.Params(), **setting)
    engine = Engine(module, stage, args.batch, torch.device(args.device))
    watch = Watch(label, engine.device)
    engine.train(data, Position(0, 0, 0), watch, watch, watch)
    return engine.method.student.eval().requires_grad_(False), watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["fp32", "bf16"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--teacher", default="resnet14")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per stage (default 2)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-subset", type=int, help="first N training images (default: all 60,000)")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST, help="the Fashion-MNIST IDX folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    single_process_group(device)
    print(f"{args.device}: process group {dist.get_backend()}, world size {dist.get_world_size()}", flush=True)

    spec = DataSpec(
        source="fashion-mnist",
        path=str(args.data),
        image_size=args.size,
        batch_size=args.batch,
        augment=False,
        loader_workers=0,
        train_subset=args.train_subset,
    )
    data = open_data(prepare_data(spec), spec, seed=0, rank=0, world=1)
    verdicts = []
    for precision in args.precision:
        started = time.perf_counter()
        teacher, first = train_stage(args, data, args.teacher, "ce", [], precision, f"{precision} teacher")
        _, second = train_stage(args, data, args.student, "kd", [teacher], precision, f"{precision} student")
        finite = bool(first.finite and second.finite)
        learned = second.epochs[-1]["val/top1"]
        verdicts.append(
            f"  {precision}: every loss finite: {finite}; student top-1 {learned:.3f} (chance 0.100); "
            f"teacher {first.epochs[-1]['val/top1']:.3f}; {time.perf_counter() - started:.0f} s"
        )
    print("\n".join(["summary:", *verdicts]))


if __name__ == "__main__":
    main()
