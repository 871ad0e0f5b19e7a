"""What the teacher-output cache saves, in one run: the same KD student trained with the online teacher, with a cold
cache and with the warm cache the cold run left, beside a label-only (CE) stage of the same student.

Whole kdpipe stages through Ray Train (2 workers each), on Fashion-MNIST held in memory with augmentation (random
crop and flip: the cache holds the teacher's logits on exactly those views). Three `run_job`s of one job:
1. the teacher (labels), the CE student and the KD student with `teacher_cache: off`;
2. the KD student again (`--force`), `teacher_cache: auto`: a cold cache, filled as it trains;
3. the KD student and the CE student again: a warm cache, and CE a second time (the machine's speed drifts).
An epoch's cost is the median over a stage's epochs of `train_seconds` (its training steps, evaluation left out);
the CE figure is the faster of the two CE runs, which makes the KD ratios the less flattering. Top-1 of the three
KD students: a cold and a warm cache train identically, and the online teacher differs by fp16 rounding only.

    .venv/bin/python bench/teacher_cache.py            # ResNet-18 teacher, MobileNetV3-small student, 32 px
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from pipeline.plan import plan_job
from pipeline.runner import run_job
from pipeline.spec import JobSpec
from pipeline.tracking import Tracker

FASHION_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"


def job(args: argparse.Namespace, root: Path, cache: str) -> JobSpec:
    student = {"model": args.student, "epochs": args.epochs, "optimizer": {"lr": 0.05}}
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
    history = tracker.metric_history(
        run_id, ["train_seconds", "val/top1", "teacher_cache/computed", "teacher_cache/read"]
    )
    return {
        "epoch": statistics.median(value for _, value in history["train_seconds"]),
        "top1": history["val/top1"][-1][1],
        "computed": sum(value for _, value in history.get("teacher_cache/computed", [])),
        "read": sum(value for _, value in history.get("teacher_cache/read", [])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenet_v3_small")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--batch", type=int, default=64, help="images per step and worker (default 64)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each student (default 3)")
    parser.add_argument("--teacher-epochs", type=int, default=2, help="epochs of the teacher (default 2)")
    parser.add_argument("--train-subset", type=int, default=6000, help="Fashion-MNIST training samples")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST, help="the Fashion-MNIST IDX folder")
    args = parser.parse_args()

    kd: dict[str, dict[str, float]] = {}
    ce: list[dict[str, float]] = []
    rounds = [  # the job's teacher_cache, the stages forced, the stages measured, what the KD run shows
        ("off", (), ("ce", "kd"), "online teacher"),
        ("auto", ("kd",), ("kd",), "cold cache"),
        ("auto", ("kd", "ce"), ("kd", "ce"), "warm cache"),
    ]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for cache, force, measured, label in rounds:
            outcomes = run_job(plan_job(job(args, root, cache)), force=force)
            tracker = Tracker(f"sqlite:///{root}/mlflow.db")
            for name in measured:
                if not outcomes[name].finished:
                    raise SystemExit(f"stage {name} failed: {outcomes[name].error}")
                found = figures(tracker, outcomes[name].run_id)
                if name == "ce":
                    ce.append(found)
                else:
                    kd[label] = found

    fastest = min(run["epoch"] for run in ce)
    print(
        f"kd {args.teacher} -> {args.student}, {args.size} px, batch {args.batch} x 2 workers, "
        f"{args.train_subset} Fashion-MNIST images with crop and flip, {args.epochs} epochs"
    )
    each = ", ".join(f"{run['epoch']:.2f}" for run in ce)
    print(
        f"  {'CE (labels only)':20s} {fastest:6.2f} s/epoch   1.00x CE   top-1 {ce[0]['top1']:.4f}   (runs: {each} s)"
    )
    for label, run in kd.items():
        print(
            f"  {'KD, ' + label:20s} {run['epoch']:6.2f} s/epoch   {run['epoch'] / fastest:4.2f}x CE   top-1 "
            f"{run['top1']:.4f}   teacher batches run {run['computed']:.0f}, read from the cache {run['read']:.0f}"
        )
    gap = 100 * (kd["warm cache"]["top1"] - kd["online teacher"]["top1"])
    print(f"  top-1, warm cache minus online teacher: {gap:+.2f} points (tolerance 0.5)")


if __name__ == "__main__":
    main()
