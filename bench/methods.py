"""Every method's example job through the real pipeline (Ray Train, DeepSpeed, MLflow), and each student's held-out
top-1 against chance on the synthetic data. Prints one row per distilled stage with its top-1 / chance ratio, and
for methods with per-epoch values (infoflow's schedule, adaptive's learned weights) how many epochs of them and
whether their plot is in the run; exits 1 if any stage failed, scored at or below chance, or lacks those.

Jobs share one MLflow store in OUT, so a teacher that several examples train identically trains once and is reused.

    .venv/bin/python bench/methods.py [--out bench-out/methods] [JOB ...]    (default: jobs/<method>.yaml for each)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdpipe.driver.runner import run_job
from kdpipe.job.spec import StageSpec
from kdpipe.methods import METHODS
from kdpipe.plan import load_plan
from kdpipe.tracking.store import Tracker

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="*", type=Path, help="job files (default: the example of every method)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/methods"), help="where data and MLflow go")
    args = parser.parse_args()
    examples = {JOBS / f"{name.split('_')[0]}.yaml" for name in METHODS if name != "ce"}
    jobs = [path.resolve() for path in args.jobs] or sorted(examples)
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # the jobs' relative paths (data, MLflow, Ray storage) land here

    table = Table(title="example jobs: held-out top-1 of each distilled stage")
    for column in ("job", "stage", "method", "status", "top-1", "chance", "top-1 / chance", "time", "per-epoch"):
        table.add_column(column, justify="right" if column in ("top-1", "chance", "top-1 / chance", "time") else "left")
    ok = True
    for path in jobs:
        plan = load_plan(path)
        chance = 1 / plan.job.data.classes
        started = time.perf_counter()
        outcomes = run_job(plan)
        tracker = Tracker(plan.job.tracking.uri)
        for outcome in outcomes.values():
            if outcome.method == "ce":
                continue
            top1 = outcome.metrics.get("val/top1", 0.0)
            logged = per_epoch_values(tracker, outcome, plan.stages[outcome.name].spec)
            ok &= outcome.finished and top1 > chance and logged != "missing"
            table.add_row(
                path.stem,
                outcome.name,
                outcome.method,
                outcome.status,
                f"{top1:.3f}",
                f"{chance:.3f}",
                f"{top1 / chance:.2f}",
                f"{outcome.seconds:.0f}s",
                logged,
            )
        print(f"{path.name}: {time.perf_counter() - started:.0f} s", flush=True)
    Console(width=140).print(table)
    return 0 if ok else 1


def per_epoch_values(tracker: Tracker, outcome, stage: StageSpec) -> str:
    """'N epochs + plot' where the method logs per-epoch values and all N epochs and the plot are in its run."""
    expected = outcome.method == "infoflow" or (outcome.method == "adaptive" and stage.params.get("adaptive", True))
    if not expected:
        return "-"
    keys = [key for key in outcome.metrics if key.startswith(f"{outcome.method}/")]
    counts = {len(points) for points in tracker.metric_history(outcome.run_id, keys).values()}
    plots = [artifact.path for artifact in tracker.client.list_artifacts(outcome.run_id, "plots")]
    complete = keys and counts == {stage.epochs} and f"plots/{outcome.method}.png" in plots
    return f"{stage.epochs} epochs + plot" if complete else "missing"


if __name__ == "__main__":
    sys.exit(main())
