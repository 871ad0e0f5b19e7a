"""A job's results across its seeds, for `kdpipe report` and the end of `kdpipe run`: per job-file stage, top-1 and
top-5 as mean ± standard deviation over its repeats, and each stage's gain over a baseline stage.

Each repeat's result is the run `kdpipe run` would reuse (the newest finished run of its fingerprint), so the
report shows what the job, as the file stands, has produced; a repeat not trained yet is counted as missing.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.driver.imports import import_digests, source_files
from kdpipe.plan import Plan

if TYPE_CHECKING:  # the results themselves need no MLflow: `kdpipe run` computes them from its outcomes
    from mlflow.entities import Run

    from kdpipe.tracking.store import Tracker

REPORT = "report"  # the job run's folder for report.md and report.png
METRICS = ("val/top1", "val/top5")
# What each stage's model costs to serve (`kdpipe.models.profile`), logged as its model is.
COSTS = ("model/params", "model/macs", "model/weights_bytes", "model/latency_ms", "model/images_per_second")
THREADS_METRIC = "model/threads"  # the CPU threads its timings ran on


@dataclass(frozen=True)
class StageResult:
    stage: str  # as the job file names it
    method: str
    teachers: tuple[str, ...]
    seeds: tuple[int, ...]  # the repeats that have a result
    planned: int  # how many repeats the job has
    values: dict[str, tuple[float, ...]]  # metric -> one value per repeat with a result

    def mean(self, metric: str) -> float | None:
        return statistics.fmean(self.values[metric]) if self.seeds else None

    def std(self, metric: str) -> float | None:
        """The sample standard deviation over repeats; None with fewer than two."""
        return statistics.stdev(self.values[metric]) if len(self.seeds) > 1 else None


def finished_runs(plan: Plan, tracker: Tracker, experiment_id: str) -> dict[str, Run | None]:
    """Each planned stage's run that `kdpipe run` would reuse; None where there is none yet."""
    from kdpipe.worker import artifacts

    prints = plan.current_fingerprints(import_digests(source_files(plan, fetch=False)))
    found: dict[str, Run | None] = {name: None for name in plan.stages}
    for name in prints:
        found[name] = tracker.find_finished_stage(experiment_id, prints[name], artifacts.FINAL_WEIGHTS)
    return found


def finished_metrics(plan: Plan, tracker: Tracker, experiment_id: str) -> dict[str, dict[str, float] | None]:
    """Each planned stage's metrics from the run `kdpipe run` would reuse, as its final weights have them (`result:
    best`: its best epoch's); None where there is none yet."""
    runs = finished_runs(plan, tracker, experiment_id)
    return {name: tracker.result_metrics(run) if run else None for name, run in runs.items()}


def job_results(plan: Plan, metrics: dict[str, dict[str, float] | None]) -> list[StageResult]:
    """One result per job-file stage, in the job's order, from each planned stage's final `metrics` (None: not
    trained yet)."""
    found: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for name, stage in plan.stages.items():
        source = stage.source or stage.spec
        found.setdefault(source.name, [])
        if metrics[name] is not None:
            found[source.name].append((stage.seed, metrics[name]))
    results = []
    for stage in plan.job.stages:
        repeats = found[stage.name]
        results.append(
            StageResult(
                stage.name,
                stage.method,
                tuple(stage.teachers),
                tuple(seed for seed, _ in repeats),
                len(plan.named(stage.name)),
                {
                    metric: tuple(metrics.get(metric, float("nan")) for _, metrics in repeats)
                    for metric in (*METRICS, *COSTS, THREADS_METRIC)
                },
            )
        )
    return results


def spread(result: StageResult, metric: str) -> str:
    mean, std = result.mean(metric), result.std(metric)
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def gain(result: StageResult, baseline: StageResult | None) -> str:
    """Top-1 over the baseline's, in points (mean against mean)."""
    if baseline is None or result.stage == baseline.stage or result.mean("val/top1") is None:
        return ""
    if baseline.mean("val/top1") is None:
        return "-"
    return f"{100 * (result.mean('val/top1') - baseline.mean('val/top1')):+.2f}"


def report_rows(results: list[StageResult], baseline: str | None) -> tuple[list[str], list[list[str]]]:
    """The report as a header and rows of text: what the terminal, Markdown and the PNG all show."""
    base = next((r for r in results if r.stage == baseline), None)
    by_name = {r.stage: r for r in results}
    threads = next((int(r.mean(THREADS_METRIC)) for r in results if measured(r, THREADS_METRIC)), None)
    timed = f", {threads} threads" if threads else ""
    cost_header = ["params", "MACs", "file", f"ms (b1{timed})", f"img/s (b64{timed})"]
    header = ["stage", "method", "teachers", "seeds", "top-1", "top-5", "of teacher", *cost_header]
    if base is not None:
        header.append(f"gain over {base.stage} (points)")
    rows = []
    for result in results:
        row = [
            result.stage,
            result.method,
            ", ".join(result.teachers) or "-",
            f"{len(result.seeds)}/{result.planned}",
            spread(result, "val/top1"),
            spread(result, "val/top5"),
            of_teacher(result, by_name.get(result.teachers[0]) if result.teachers else None),
            *costs(result),
        ]
        rows.append(row + ([gain(result, base)] if base is not None else []))
    return header, rows


def of_teacher(result: StageResult, teacher: StageResult | None) -> str:
    """The student's top-1 as a fraction of its (first) teacher's, mean against mean."""
    if teacher is None or result.mean("val/top1") is None or not teacher.mean("val/top1"):
        return ""
    return f"{result.mean('val/top1') / teacher.mean('val/top1'):.3f}"


def costs(result: StageResult) -> list[str]:
    """Size and speed of the stage's model (the mean over its repeats: timings vary, sizes do not)."""
    if not all(measured(result, metric) for metric in COSTS):
        return ["-"] * len(COSTS)
    params, macs, size, latency, throughput = (result.mean(metric) for metric in COSTS)
    return [count(params), count(macs), f"{size / 1e6:.2f} MB", f"{latency:.2f}", f"{throughput:.0f}"]


def measured(result: StageResult, metric: str) -> bool:
    """The stage has a result, and it holds `metric` (runs from before kdpipe logged a model's costs do not)."""
    value = result.mean(metric)
    return value is not None and not math.isnan(value)


def count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def markdown(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (
        "Top-1 and top-5 on the held-out split: mean ± sample standard deviation over the seeds with a result; "
        "of teacher: top-1 as a fraction of the first teacher's. params, MACs per image, weight file, CPU "
        "latency at batch 1 and throughput at batch 64 (median of several runs): each stage's model as logged."
    )
    return "\n".join(lines + ["", note, ""])


def log_report(
    tracker: Tracker, job_run: str, title: str, results: list[StageResult], baseline: str | None, plot: bool = True
) -> str:
    """Write report.md (and, with `plot`, report.png) into the job run; returns the Markdown."""
    header, rows = report_rows(results, baseline)
    text = markdown(title, header, rows)
    with tempfile.TemporaryDirectory() as folder:
        files = [Path(folder) / "report.md"]
        files[0].write_text(text)
        if plot:
            from kdpipe.plots import plot_report, plot_tradeoff  # matplotlib: a second or so to import

            files.append(plot_report(results, baseline, title, Path(folder) / "report.png"))
            if any(measured(r, "model/latency_ms") for r in results):
                files.append(plot_tradeoff(results, title, Path(folder) / "tradeoff.png"))
        tracker.artifacts(job_run).log_files(files, REPORT)
    return text
