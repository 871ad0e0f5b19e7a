"""The `kdpipe` command: run and validate distillation jobs.

Every user mistake surfaces as a `UserError`, caught once here: one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.errors import UserError
from pipeline.startup import collector_paused

console = Console()
err_console = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdpipe",
        description="Knowledge-distillation pipelines: a job file names stages (teacher, assistants, students), "
        "each trained as a Ray Train + DeepSpeed job and recorded in MLflow.",
        epilog="Run 'kdpipe COMMAND --help' for a command's options. User errors exit with status 2.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run every stage of a job, teachers before students",
        description="Run a job: prepare its data, then train each stage (a Ray Train run of DeepSpeed workers) "
        "once its teachers are done; stages with no path between them run side by side when the cluster has "
        "room. Joins the Ray cluster in RAY_ADDRESS, or starts a local one. Prints a table at the end; exits "
        "1 if any stage failed.",
    )
    run.add_argument("job", type=Path, help="the job file (YAML); see jobs/ for examples")
    run.add_argument("-v", "--verbose", action="store_true", help="show Ray, DeepSpeed and worker logs")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="retrain STAGE and every stage downstream of it in new MLflow runs, even if finished runs exist "
        "(earlier runs and their artifacts are kept); repeatable",
    )
    run.add_argument(
        "--tracking-uri", metavar="URI", help="log to this MLflow store instead of the job file's tracking.uri"
    )
    add_settings(run)

    status = commands.add_parser(
        "status",
        help="show what MLflow holds for each stage of a job",
        description="A table of the job's stages: pending (never trained), outdated (trained, but something it "
        "learns from has changed since: the next run trains it again), running, interrupted (its driver is gone: "
        "the next 'kdpipe run' resumes it), done, reused (by the latest run of the job) or failed; the MLflow run "
        "id, epochs done, the latest checkpoint's step, the best validation top-1 and the run's duration.",
    )
    add_job_or_run(status)

    report = commands.add_parser(
        "report",
        help="a job's results: top-1 and top-5 per stage, mean ± std over its seeds",
        description="A table per job-file stage of its final val top-1 and top-5 as mean ± sample standard "
        "deviation over its seeds (the runs a 'kdpipe run' of the job would reuse), and each stage's top-1 gain "
        "in points over the baseline stage (--baseline, or the job file's baseline). Logs report.md and "
        "report.png (bars with error bars, and the job's DAG) into the job's latest job run.",
    )
    add_job_or_run(report)
    report.add_argument("--baseline", metavar="STAGE", help="the stage whose top-1 the gains are measured from")
    report.add_argument("--markdown", type=Path, metavar="FILE", help="also write the report as Markdown here")

    validate = commands.add_parser(
        "validate",
        help="check a job file without running it",
        description="Check a job file: schema, stage graph (unknown teachers, cycles, duplicates), model and "
        "method names, method parameters and data paths. Prints the stage order; nothing is trained.",
    )
    validate.add_argument("job", type=Path, help="the job file (YAML)")
    add_settings(validate)

    data = commands.add_parser(
        "data", help="write and check WebDataset shards", description="Write and check WebDataset shards."
    )
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    shard = data_commands.add_parser(
        "shard",
        help="convert an ImageFolder, CIFAR or Fashion-MNIST copy into tar shards and a manifest",
        description="Write SRC's training and held-out splits as OUT/{train,val}-NNNNNN.tar shards in a fixed "
        "shuffled order, plus OUT/manifest.json (classes and their indices; per shard: samples, bytes, sha256). "
        "SRC is an ImageFolder tree (train/ and val/ class folders, the ImageNet layout; JPEG and PNG bytes are "
        "kept as they are), a torchvision CIFAR-10/100 root, or a folder of Fashion-MNIST IDX files (stored as "
        "PNG). Shards are written by parallel processes; an interrupted run, started again with the same "
        "arguments, writes only the shards still missing.",
    )
    shard.add_argument("src", type=Path, help="the data set to convert")
    shard.add_argument("out", type=Path, help="the folder for shards and manifest (empty, or an interrupted run's)")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    shard.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="processes writing shards (default: one per core)"
    )
    verify = data_commands.add_parser(
        "verify",
        help="check every shard against its manifest",
        description="Check each shard listed in OUT/manifest.json: present, a readable tar, every image "
        "decodes, its sample count and sha256 as the manifest says. Prints one line per bad shard; exit 2 if any.",
    )
    verify.add_argument("out", type=Path, help="a folder written by 'kdpipe data shard'")
    commands.add_parser(
        "methods",
        help="list the distillation methods, their parameters and papers",
        description="Every method a stage's 'method' may name: its parameters ('params' in the job file) with "
        "their defaults, how many teachers it takes, and the paper it implements.",
    )
    add_cluster_commands(commands)
    return parser


def add_job_or_run(parser: argparse.ArgumentParser) -> None:
    """The JOB of `status` and `report`: a job file (with `--set`s) or a job run's id (in --tracking-uri)."""
    parser.add_argument("job", help="the job file (YAML), or the MLflow run id of one run of the job")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow store to look in when JOB is a run id (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    add_settings(parser)


def add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="set a field of the job file for this command, checked like the file: PATH is dotted, a stage named "
        "by its name (stages.student.optimizer.lr=0.05, data.batch_size=128, seed=7); VALUE is read as YAML. "
        "Repeatable; the job run records them (tag kdpipe.set)",
    )


def add_cluster_commands(commands) -> None:
    """submit, jobs, logs, stop: the Ray Jobs API of a cluster, authenticated with its Ray token."""
    address = {
        "metavar": "URL",
        "help": "the Ray head's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS). The Ray auth "
        "token is read from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    }
    submit = commands.add_parser(
        "submit",
        help="run a job on a Ray cluster (Ray Jobs API); prints the Ray job id",
        description="Submit 'kdpipe run JOB' as a Ray job: the runtime env carries this kdpipe package and the job "
        "file, the head runs it with the cluster's Python ($KDPIPE_PYTHON there, else python), and the job file's "
        "relative paths (workdir, data, a sqlite store) are taken from the folder every node shares ($KDPIPE_STORAGE "
        "on the cluster, or --storage). Submitting the same job again reuses its finished stages and resumes an "
        "interrupted one. Prints the job id on stdout.",
    )
    submit.add_argument("job", type=Path, help="the job file (YAML)")
    submit.add_argument("--address", **address)
    submit.add_argument("--storage", metavar="DIR", help="the cluster's shared folder, overriding its KDPIPE_STORAGE")
    submit.add_argument("--tracking-uri", metavar="URI", help="the cluster's MLflow server, e.g. http://HEAD:5000")
    add_settings(submit)
    jobs = commands.add_parser(
        "jobs",
        help="list the kdpipe jobs on a Ray cluster",
        description="A table of the kdpipe jobs Ray knows: id, kdpipe job, status, start, end, Ray's message.",
    )
    jobs.add_argument("--address", **address)
    logs = commands.add_parser("logs", help="print a job's logs", description="Print the driver log of a Ray job.")
    logs.add_argument("job_id", help="the id 'kdpipe submit' printed")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the job ends; exit 1 unless it succeeded"
    )
    logs.add_argument("--address", **address)
    stop = commands.add_parser(
        "stop",
        help="stop a running job",
        description="Stop a Ray job and wait until it has ended. Its finished stages stay in MLflow and an "
        "interrupted stage keeps its checkpoints: submitting the job again resumes it.",
    )
    stop.add_argument("job_id", help="the id 'kdpipe submit' printed")
    stop.add_argument("--address", **address)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "validate": cmd_validate,
            "run": cmd_run,
            "status": cmd_status,
            "data": cmd_data,
            "submit": cmd_submit,
            "jobs": cmd_jobs,
            "logs": cmd_logs,
            "stop": cmd_stop,
            "methods": cmd_methods,
            "report": cmd_report,
        }
        if args.command in ("validate", "run", "status", "report"):
            enter_storage(args)
        return commands[args.command](args)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    finally:
        # The interpreter's last garbage collection walks every object torch and MLflow made at import (over a
        # second); whatever the command left behind is freed at exit by reference counting anyway.
        gc.freeze()


def enter_storage(args: argparse.Namespace) -> None:
    """On a cluster, take the job file's relative paths from KDPIPE_STORAGE, the folder all its nodes share."""
    storage = os.environ.get("KDPIPE_STORAGE")
    if not storage:
        return
    if Path(args.job).is_file():
        args.job = Path(args.job).resolve()
    try:
        os.chdir(storage)
    except OSError as err:
        raise UserError(f"KDPIPE_STORAGE: cannot use {storage} ({err.strerror}); expected a shared folder") from None


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.plan import load_plan

    plan = load_plan(args.job, settings=args.settings)
    order = " -> ".join(plan.order)
    console.print(f"{args.job}: ok, {len(plan.order)} stages in order: {order}", highlight=False, soft_wrap=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.plan import load_plan

    plan = load_plan(args.job, settings=args.settings)
    if args.tracking_uri:
        plan.job.tracking.uri = args.tracking_uri
    for name in args.force:
        if not plan.named(name):
            raise UserError(f"--force: no stage '{name}' in {args.job}; its stages are: {', '.join(plan.order)}")
    with collector_paused():  # heavy imports (Ray, MLflow) only once the job file is known good
        from pipeline.runner import run_job

    with Progress(
        TextColumn("{task.fields[stage]:<14}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=2,
    ) as progress:
        bars = {name: progress.add_task("", total=None, stage=name, info="pending", start=False) for name in plan.order}

        def on_poll(outcomes, live):
            for name, outcome in outcomes.items():
                bar, seen = bars[name], live.get(name, {})
                if outcome.status == "running" and "search" in seen:
                    trials, counts = plan.stages[name].spec.search.trials, seen["search"]
                    ended = counts["done"] + counts["pruned"] + counts["failed"]
                    info = f"trials {ended}/{trials}: {counts['running']} running, {counts['pruned']} pruned"
                    if counts["best"] is not None:
                        info += f", best {counts['best']:.3f}"
                    progress.start_task(bar)
                    progress.update(bar, total=trials, completed=ended, info=info)
                elif outcome.status == "running" and "epochs" in seen:
                    progress.start_task(bar)
                    total = seen["epochs"] * seen["steps"]
                    done = seen["epoch"] * seen["steps"] + seen["step"]
                    info = f"epoch {min(seen['epoch'] + 1, seen['epochs'])}/{seen['epochs']}"
                    if "top1" in seen:
                        info += f"  top-1 {seen['top1']:.3f}"
                    progress.update(bar, total=total, completed=done, info=info)
                elif outcome.status in ("done", "reused", "failed", "skipped"):
                    progress.update(bar, total=1, completed=1 if outcome.finished else 0, info=outcome.status)
                    progress.stop_task(bar)
                elif outcome.status == "running":
                    progress.start_task(bar)
                    progress.update(bar, info="starting workers")
                elif outcome.status == "waiting":
                    progress.update(bar, info="waiting: another kdpipe driver trains it")

        outcomes = run_job(plan, force=tuple(args.force), verbose=args.verbose, on_poll=on_poll)
    print_table(outcome_table(plan.job.name, outcomes))
    for outcome in outcomes.values():
        if outcome.chosen:
            chosen = ", ".join(
                f"{path}={value:.4g}" if isinstance(value, float) else f"{path}={value}"
                for path, value in outcome.chosen.items()
            )
            console.print(f"{outcome.name}: searched, chose {chosen}", highlight=False, soft_wrap=True)
    for outcome in outcomes.values():
        if outcome.error and outcome.status != "reused":
            err_console.print(f"[red]{outcome.name}[/]: {outcome.error}", highlight=False, soft_wrap=True)
    return 0 if all(o.finished for o in outcomes.values()) else 1


def print_table(table: Table) -> None:
    # Logs and CI are not terminals (rich assumes 80 columns there): keep the run ids whole.
    (console if console.is_terminal else Console(width=140)).print(table)


def outcome_table(job: str, outcomes: dict) -> Table:
    table = Table(title=f"kdpipe job '{job}'")
    for column in ("stage", "method", "teachers", "status", "top-1", "top-5", "time", "MLflow run id"):
        table.add_column(
            column,
            justify="right" if column in ("top-1", "top-5", "time") else "left",
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
            f"{o.seconds:.0f}s",
            o.run_id or "-",
        )
    return table


def cmd_data(args: argparse.Namespace) -> int:
    from pipeline.data.convert import convert
    from pipeline.data.shards import MANIFEST, read_manifest, verify_shards

    if args.data_command == "shard":
        for flag, value in (("--shard-size", args.shard_size), ("--workers", args.workers)):
            if value < 1:
                raise UserError(f"{flag}: expected a positive number, got {value}")
        manifest = convert(args.src, args.out, args.shard_size, args.workers)
        splits = manifest["splits"].items()
        counts = ", ".join(f"{name} {split['count']} in {len(split['shards'])}" for name, split in splits)
        console.print(f"{args.out}: {counts} shards; {len(manifest['classes'])} classes", highlight=False)
        return 0
    problems = verify_shards(args.out)
    if problems:
        raise UserError("\n".join(problems))
    splits = read_manifest(args.out)["splits"]
    shards = sum(len(split["shards"]) for split in splits.values())
    samples = sum(split["count"] for split in splits.values())
    console.print(f"{args.out}: ok, {shards} shards, {samples} samples match {MANIFEST}", highlight=False)
    return 0


def job_and_tracker(args: argparse.Namespace):
    """The plan and MLflow store of `status` and `report`: from a job file (with its `--set`s), or from a job
    run's id (the job run stores the job it ran as job.json)."""
    from pipeline.plan import load_plan, plan_job
    from pipeline.spec import JobSpec
    from pipeline.tracking import Tracker, TrackingError

    if Path(args.job).is_file():
        plan = load_plan(args.job, settings=args.settings)
        return plan, Tracker(plan.job.tracking.uri)
    tracker = Tracker(args.tracking_uri)
    try:
        run = tracker.client.get_run(args.job)
        with tempfile.TemporaryDirectory() as folder:
            stored = tracker.client.download_artifacts(run.info.run_id, "job.json", folder)
            job = JobSpec.model_validate_json(Path(stored).read_text())
    except TrackingError:
        raise UserError(f"{args.job}: neither a job file nor a kdpipe job run in {tracker.uri}") from None
    return plan_job(job), tracker


def cmd_status(args: argparse.Namespace) -> int:
    with collector_paused():  # MLflow's import
        from pipeline.status import job_status
        from pipeline.tracking import TrackingError

    plan, tracker = job_and_tracker(args)
    try:
        rows = job_status(plan, tracker, tracker.experiment_id(plan.job.tracking.experiment))
    except TrackingError as err:
        raise UserError(str(err)) from None
    table = Table(title=f"kdpipe job '{plan.job.name}' in {tracker.uri}")
    for column in ("stage", "method", "state", "epochs", "step", "best top-1", "time", "MLflow run id"):
        table.add_column(column, justify="right" if column in ("step", "best top-1", "time") else "left")
    for row in rows:
        table.add_row(
            row.name,
            row.method,
            row.state,
            row.epochs or "-",
            str(row.step) if row.run_id else "-",
            f"{row.best_top1:.3f}" if row.best_top1 is not None else "-",
            f"{row.seconds:.0f}s" if row.seconds is not None else "-",
            row.run_id or "-",
        )
    if any(row.state == "outdated" for row in rows):
        table.caption = "outdated: its run was trained with an older fingerprint; the next 'kdpipe run' trains it again"
    print_table(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    with collector_paused():  # MLflow's import
        from pipeline.plan import check_baseline
        from pipeline.report import finished_metrics, job_results, log_report, report_rows
        from pipeline.tracking import TrackingError

    plan, tracker = job_and_tracker(args)
    baseline = args.baseline or plan.job.baseline
    check_baseline(plan.job, baseline, "--baseline")
    title = f"kdpipe job '{plan.job.name}'"
    try:
        experiment = tracker.experiment_id(plan.job.tracking.experiment)
        results = job_results(plan, finished_metrics(plan, tracker, experiment))
        job_run = tracker.latest_job_run(experiment, plan.job.name)
        text = log_report(tracker, job_run.info.run_id, title, results, baseline) if job_run else None
    except TrackingError as err:
        raise UserError(str(err)) from None
    header, rows = report_rows(results, baseline)
    table = Table(title=f"{title} in {tracker.uri}")
    for column in header:
        table.add_column(column, justify="left" if column in ("stage", "method", "teachers") else "right")
    for row in rows:
        table.add_row(*row)
    table.caption = "val top-1 and top-5 of each stage's final epoch: mean ± std over its seeds"
    print_table(table)
    if text is None:
        err_console.print(f"no run of job '{plan.job.name}' in {tracker.uri} yet: nothing to report")
        return 0
    if args.markdown:
        args.markdown.write_text(text)
    console.print(f"logged report.md and report.png into job run {job_run.info.run_id}", highlight=False)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from pipeline.methods import METHODS

    table = Table(title="kdpipe methods", show_lines=True)
    for column in ("method", "teachers", "params (default)", "paper"):
        table.add_column(column, overflow="fold")
    for name, method in sorted(METHODS.items()):
        low, high = method.min_teachers, method.max_teachers
        teachers = f"{low}+" if high is None else str(low) if low == high else f"{low}-{high}"
        params = "\n".join(
            f"{key} = {field.get_default(call_default_factory=True)!r}"
            for key, field in method.Params.model_fields.items()
        )
        table.add_row(name, teachers, params or "-", method.paper)
    print_table(table)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline import cluster
    from pipeline.plan import load_plan

    # Everything but the data path is checked here, before the cluster is contacted; the path is the cluster's
    # (its shared storage, a bucket), and a missing one fails the job there, in one line of its log.
    job = load_plan(args.job, check_paths=False, settings=args.settings).job
    with cluster.session(args.address) as client:
        job_id = cluster.submit(client, args.job, job, args.storage, args.tracking_uri, args.settings)
    print(job_id)
    err_console.print(f"follow it with: kdpipe logs --follow {job_id}", highlight=False)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipeline import cluster

    with cluster.session(args.address) as client:
        jobs = cluster.kdpipe_jobs(client)
    table = Table(title="kdpipe jobs on the cluster")
    for column in ("job id", "kdpipe job", "status", "started", "ended", "message"):
        table.add_column(column, no_wrap=column == "job id")
    for job in jobs:
        table.add_row(
            job.submission_id,
            job.metadata[cluster.METADATA_JOB],
            str(job.status.value),
            clock(job.start_time),
            clock(job.end_time),
            (job.message or "")[:60],
        )
    print_table(table)
    return 0


def clock(milliseconds: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(milliseconds / 1000)) if milliseconds else "-"


def cmd_logs(args: argparse.Namespace) -> int:
    from pipeline import cluster

    with cluster.session(args.address) as client:
        if not args.follow:
            sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        status = cluster.follow_logs(client, args.job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    err_console.print(f"{args.job_id}: {status.value}", highlight=False)
    return 0 if status.value == "SUCCEEDED" else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from pipeline import cluster

    with cluster.session(args.address) as client:
        status = cluster.stop(client, args.job_id)
    console.print(f"{args.job_id}: {status.value}", highlight=False)
    return 0 if status.is_terminal() else 1


if __name__ == "__main__":
    sys.exit(main())
