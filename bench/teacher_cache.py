"""What the teacher-output cache saves, in one run: the same KD student trained with the online teacher, with a cold
cache and with the warm cache the cold run left, beside a label-only (CE) student.

(a) kdpipe's engine in one process (no Ray): steps of CE, of KD with the online teacher and of KD reading a warm
    cache, on the same batches, alternating for `--rounds` rounds; each keeps its best round.
(b) whole kdpipe stages through Ray Train (2 workers each), on Fashion-MNIST held in memory with augmentation
    (random crop and flip: the cache holds the teacher's logits on exactly those views). Three `run_job`s of one
    job: 1. the teacher (labels), the CE student and the KD student with `teacher_cache: off`; 2. the KD student
    again (`--force`) with `teacher_cache: auto`: a cold cache, filled as it trains; 3. the KD student and the CE
    student again: a warm cache, and CE a second time (the machine's speed drifts over minutes). A stage's epoch
    cost is its best epoch after the first (`train_seconds`: its training steps, evaluation left out); CE's is the
    faster of its two runs, which makes the KD ratios the less flattering.
The KD students' first-epoch training loss and final top-1: a cold and a warm cache train identically, and the
online teacher differs by fp16 rounding of its logits, which SGD then amplifies over the epochs.

    .venv/bin/python bench/teacher_cache.py            # torchvision's ResNet-18 teaching a CIFAR ResNet-8, 32 px
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kdpipe.driver.runner import run_job
from kdpipe.job.spec import JobSpec, StageSpec
from kdpipe.methods import METHODS
from kdpipe.models import build_model
from kdpipe.plan import plan_job
from kdpipe.tracking.store import Tracker
from kdpipe.worker.engine import Engine, single_process_group
from kdpipe.worker.teacher_cache import CachedTeacher, TeacherCache, TeacherCaches

FASHION_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
CLASSES = 10


def engine(args: argparse.Namespace, method: str, teachers: list) -> Engine:
    torch.manual_seed(0)
    spec = StageSpec(name="bench", model=args.student, method=method, teachers=["t"] * len(teachers), epochs=1)
    cls = METHODS[method]
    module = cls(build_model(args.student, CLASSES), teachers, cls.Params(), model=args.student, num_classes=CLASSES)
    built = Engine(module, spec, args.batch, torch.device("cpu"))
    built.ds.train()
    return built


def epoch_seconds(step, batches: list, caches: TeacherCaches | None = None) -> float:
    """One pass over the batches as an epoch of steps, told to the caches as the engine tells them."""
    if caches:
        caches.begin_epoch(0, len(batches))
    started = time.perf_counter()
    for i, (images, labels) in enumerate(batches):
        if caches:
            caches.at_step(i)
        step(images, labels)
    seconds = time.perf_counter() - started
    if caches:
        caches.end_epoch()
    return seconds


def engine_steps(args: argparse.Namespace) -> dict[str, float]:
    """(a): the best seconds per pass of CE, KD online and KD from a warm cache (filled by one untimed pass)."""
    single_process_group(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    batches = [
        (
            torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last),
            torch.randint(0, CLASSES, (args.batch,), generator=generator),
        )
        for _ in range(args.steps)
    ]
    teacher = build_model(args.teacher, CLASSES).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        cached = CachedTeacher(teacher, TeacherCache(folder, "bench", 0))
        caches = TeacherCaches([cached])
        runs = {
            "CE (labels only)": (engine(args, "ce", []).step, None),
            "KD, online teacher": (engine(args, "kd", [teacher]).step, None),
            "KD, warm cache": (engine(args, "kd", [cached]).step, caches),
        }
        epoch_seconds(runs["KD, warm cache"][0], batches, caches)  # fills the cache
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.rounds):
            for name, (step, cache) in runs.items():
                best[name] = min(best[name], epoch_seconds(step, batches, cache))
    return best


def job(args: argparse.Namespace, root: Path, cache: str) -> JobSpec:
    student = {"model": args.student, "epochs": args.epochs, "optimizer": {"lr": 0.1}}
    return JobSpec.model_validate(
        {
            "name": "bench-teacher-cache",
            "workdir": str(root / "out"),
            "teacher_cache": cache,
            "data": {
                "source": "fashion-mnist",
                "path": str(args.data),
                "image_size": args.size,
                "batch_size": args.batch,
                "loader_workers": 0,
                "train_subset": args.train_subset,
            },
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "bench"},
            "stages": [
                {"name": "teacher", "model": args.teacher, "epochs": args.teacher_epochs, "optimizer": {"lr": 0.1}},
                {"name": "ce", "method": "ce", **student},
                {"name": "kd", "method": "kd", "teachers": ["teacher"], **student},
            ],
        }
    )


def figures(tracker: Tracker, run_id: str) -> dict[str, float]:
    keys = ["train_seconds", "train/loss", "val/top1", "teacher_cache/computed", "teacher_cache/read"]
    history = tracker.metric_history(run_id, keys)
    return {
        "epoch": min(value for epoch, value in history["train_seconds"] if epoch > 0),
        "loss": history["train/loss"][0][1],
        "top1": history["val/top1"][-1][1],
        "computed": sum(value for _, value in history["teacher_cache/computed"]),
        "read": sum(value for _, value in history["teacher_cache/read"]),
    }


def stages(args: argparse.Namespace) -> tuple[list[dict[str, float]], dict[str, dict[str, float]], float]:
    """(b): the CE runs, the KD runs by how they got their teacher's logits, and the teacher's top-1."""
    kd: dict[str, dict[str, float]] = {}
    ce: list[dict[str, float]] = []
    rounds = [  # the job's teacher_cache, the stages forced and measured, what the KD run shows
        ("off", ("ce", "kd"), "online teacher"),
        ("auto", ("kd",), "cold cache"),
        ("auto", ("kd", "ce"), "warm cache"),
    ]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for i, (cache, names, label) in enumerate(rounds):
            outcomes = run_job(plan_job(job(args, root, cache)), force=names if i else ())
            tracker = Tracker(f"sqlite:///{root}/mlflow.db")
            for name in names:
                if not outcomes[name].finished:
                    raise SystemExit(f"stage {name} failed: {outcomes[name].error}")
                found = figures(tracker, outcomes[name].run_id)
                if name == "ce":
                    ce.append(found)
                else:
                    kd[label] = found
        return ce, kd, outcomes["teacher"].metrics["val/top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--batch", type=int, default=64, help="images per step and worker (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="(a): steps per timed pass (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="(a): alternating rounds; the best counts")
    parser.add_argument("--epochs", type=int, default=5, help="(b): epochs of each student (default 5)")
    parser.add_argument("--teacher-epochs", type=int, default=2, help="(b): epochs of the teacher (default 2)")
    parser.add_argument("--train-subset", type=int, default=6000, help="(b): Fashion-MNIST training samples")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST, help="the Fashion-MNIST IDX folder")
    args = parser.parse_args()

    print(f"kd {args.teacher} -> {args.student}, {args.size} px, batch {args.batch}, fp32, CPU")
    steps = engine_steps(args)
    ce_pass = steps["CE (labels only)"]
    print(f"(a) kdpipe's engine, one process, {args.steps} steps per pass, best of {args.rounds} alternating rounds:")
    for name, seconds in steps.items():
        print(f"  {name:20s} {args.steps * args.batch / seconds:8.1f} images/s   {seconds / ce_pass:4.2f}x CE")

    ce, kd, teacher_top1 = stages(args)
    fastest = min(run["epoch"] for run in ce)
    print(
        f"(b) kdpipe stages, 2 Ray Train workers, {args.train_subset} Fashion-MNIST images with crop and flip, "
        f"{args.epochs} epochs (teacher top-1 {teacher_top1:.4f}); best epoch after the first:"
    )
    each = ", ".join(f"{run['epoch']:.2f}" for run in ce)
    top1 = ce[0]["top1"]
    print(f"  {'CE (labels only)':20s} {fastest:6.2f} s/epoch   1.00x CE   top-1 {top1:.4f}   (runs: {each} s)")
    for label, run in kd.items():
        cached = run["computed"] + run["read"]
        source = f"teacher batches run {run['computed']:.0f}, read {run['read']:.0f}" if cached else "no cache"
        print(
            f"  {'KD, ' + label:20s} {run['epoch']:6.2f} s/epoch   {run['epoch'] / fastest:4.2f}x CE   top-1 "
            f"{run['top1']:.4f}   epoch-1 loss {run['loss']:.6f}   {source}"
        )
    online, warm = kd["online teacher"], kd["warm cache"]
    print(
        f"  warm cache against the online teacher: epoch-1 loss {warm['loss'] / online['loss'] - 1:+.2e} relative, "
        f"final top-1 {100 * (warm['top1'] - online['top1']):+.2f} points"
    )


if __name__ == "__main__":
    main()
