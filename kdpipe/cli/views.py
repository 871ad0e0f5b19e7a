"""What the `kdpipe` commands print: rich tables of outcomes, status, reports, methods and cluster jobs."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_table(table: Table) -> None:
    # Logs and CI are not terminals (rich assumes 80 columns there): keep run ids and the report's cells whole.
    (console if console.is_terminal else Console(width=200)).print(table)


def table_of(title: str, columns: list[str], right: tuple[str, ...] = (), rows: list[list[str]] = ()) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*row)
    return table


def outcome_table(job: str, outcomes: dict) -> Table:
    """The end of `kdpipe run`: each stage's status, result, time and run."""
    table = Table(title=f"kdpipe job '{job}'")
    numbers = ("top-1", "top-5", "params", "ms (b1)", "time")
    for column in ("stage", "method", "teachers", "status", *numbers, "MLflow run id"):
        table.add_column(
            column,
            justify="right" if column in numbers else "left",
            no_wrap=column == "MLflow run id",
            min_width=32 if column == "MLflow run id" else None,
        )
    for o in outcomes.values():
        top5 = next((v for k, v in o.metrics.items() if k.startswith("val/top") and k != "val/top1"), None)
        table.add_row(
            o.name,
            o.method,
            ", ".join(o.teachers) or "-",
            f"{o.status} (resumed)" if o.resumed else o.status,
            f"{o.metrics['val/top1']:.3f}" if "val/top1" in o.metrics else "-",
            f"{top5:.3f}" if top5 is not None else "-",
            f"{o.metrics['model/params'] / 1e6:.2f}M" if "model/params" in o.metrics else "-",
            f"{o.metrics['model/latency_ms']:.2f}" if "model/latency_ms" in o.metrics else "-",
            f"{o.seconds:.0f}s",
            o.run_id or "-",
        )
    return table


def eval_table(title: str, result) -> Table:
    """`kdpipe eval`: the summary, then each class's accuracy (`kdpipe.driver.evaluation.Evaluation`)."""
    table = Table(title=title)
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, value in result.metrics().items():
        if not name.startswith("eval/class/"):
            table.add_row(name.removeprefix("eval/"), f"{value:.4f}", style="bold")
    for name, value in result.per_class().items():
        table.add_row(name, f"{value:.4f}")
    return table


def chosen_values(chosen: dict) -> str:
    return ", ".join(
        f"{path}={value:.4g}" if isinstance(value, float) else f"{path}={value}" for path, value in chosen.items()
    )


def status_table(title: str, rows: list) -> Table:
    """`kdpipe status`: what MLflow holds for each stage (`kdpipe.driver.status.StageStatus` rows)."""
    columns = ["stage", "method", "state", "epochs", "step", "best top-1", "time", "MLflow run id"]
    cells = [
        [
            row.name,
            row.method,
            row.state,
            row.epochs or "-",
            str(row.step) if row.run_id else "-",
            f"{row.best_top1:.3f}" if row.best_top1 is not None else "-",
            f"{row.seconds:.0f}s" if row.seconds is not None else "-",
            row.run_id or "-",
        ]
        for row in rows
    ]
    return table_of(title, columns, ("step", "best top-1", "time"), cells)


def methods_table(methods: dict) -> Table:
    """`kdpipe methods`: every method's teachers, params with their defaults, and paper."""
    table = Table(title="kdpipe methods", show_lines=True)
    for column in ("method", "teachers", "params (default)", "paper"):
        table.add_column(column, overflow="fold")
    for name, method in sorted(methods.items()):
        low, high = method.min_teachers, method.max_teachers
        teachers = f"{low}+" if high is None else str(low) if low == high else f"{low}-{high}"
        params = "\n".join(
            f"{key} = {field.get_default(call_default_factory=True)!r}"
            for key, field in method.Params.model_fields.items()
        )
        table.add_row(name, teachers, params or "-", method.paper)
    return table


def jobs_table(jobs: list, job_key: str) -> Table:
    """`kdpipe jobs`: the cluster's kdpipe jobs."""
    table = Table(title="kdpipe jobs on the cluster")
    for column in ("job id", "kdpipe job", "status", "started", "ended", "message"):
        table.add_column(column, no_wrap=column == "job id")
    for job in jobs:
        table.add_row(
            job.submission_id,
            job.metadata[job_key],
            str(job.status.value),
            clock(job.start_time),
            clock(job.end_time),
            (job.message or "")[:60],
        )
    return table


def clock(milliseconds: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(milliseconds / 1000)) if milliseconds else "-"
