"""Equal, learned and searched path weights on Fashion-MNIST (issue 13): runs jobs/search-adaptive.yaml through the
real pipeline and prints, for each student (same model, paths and epochs), its held-out top-1 and the compute it
took in trial-epochs (epochs trained, every trial of the search counted, pruned ones for the epochs they ran).

    .venv/bin/python bench/search.py [--out bench-out/search] [JOB]

Run from the repository root (the job reads ../shared/data/fashion-mnist). Exits 1 if a stage failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdpipe.driver.runner import run_job
from kdpipe.plan import load_plan
from kdpipe.tracking.store import Tracker

JOB = Path(__file__).resolve().parents[1] / "jobs" / "search-adaptive.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", type=Path, default=JOB, help="the job (default: jobs/search-adaptive.yaml)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/search"), help="where MLflow and Ray's files go")
    args = parser.parse_args()
    plan = load_plan(args.job)
    job = plan.job.model_copy(
        update={
            "data": plan.job.data.model_copy(update={"path": str(Path(plan.job.data.path).resolve())}),
            "workdir": str(args.out.resolve() / "out"),
            "tracking": plan.job.tracking.model_copy(update={"uri": f"sqlite:///{args.out.resolve()}/mlflow.db"}),
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)
    started = time.perf_counter()
    outcomes = run_job(dataclasses.replace(plan, job=job))
    tracker = Tracker(job.tracking.uri)

    table = Table(title=f"{job.name}: the same student, three ways to weigh its paths ({plan.job.data.source})")
    for column in ("student", "weights", "status", "top-1", "trial-epochs", "time"):
        table.add_column(column, justify="left" if column in ("student", "weights", "status") else "right")
    ok = all(outcome.finished for outcome in outcomes.values())
    for name, outcome in outcomes.items():
        spec = plan.stages[name].spec
        if spec.method != "adaptive":
            continue
        if spec.search:
            trials = tracker.trial_runs(tracker.experiment_id(job.tracking.experiment), outcome.run_id)
            compute = sum(len(tracker.metric_history(run.info.run_id, ["val/top1"])["val/top1"]) for run in trials)
            how = "searched: " + ", ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in outcome.chosen.items())
        else:
            compute = spec.epochs
            how = "learned" if spec.params.get("adaptive", True) else "equal (1, 1)"
        table.add_row(
            name,
            how,
            outcome.status,
            f"{outcome.metrics.get('val/top1', 0.0):.4f}",
            str(compute),
            f"{outcome.seconds:.0f}s",
        )
    Console(width=140).print(table)
    print(f"whole job: {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
