"""The `kdpipe` commands, one function each: parse what the user gave, call the layer that does the work, print
its view. Heavy imports (torch, Ray, MLflow) happen inside each command, once its input is known good."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

from kdpipe.cli.views import (
    chosen_values,
    console,
    err_console,
    eval_table,
    jobs_table,
    methods_table,
    outcome_table,
    print_table,
    status_table,
    table_of,
)
from kdpipe.errors import UserError
from kdpipe.startup import collector_paused
from kdpipe.terminal import progress_bar


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
    from kdpipe.plan import load_plan

    plan = load_plan(args.job, settings=args.settings, check_models=True)
    order = " -> ".join(plan.order)
    console.print(f"{args.job}: ok, {len(plan.order)} stages in order: {order}", highlight=False, soft_wrap=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kdpipe.plan import load_plan

    plan = load_plan(args.job, settings=args.settings, check_models=True)
    if args.tracking_uri:
        plan.job.tracking.uri = args.tracking_uri
    for name in args.force:
        if not plan.named(name):
            raise UserError(f"--force: no stage '{name}' in {args.job}; its stages are: {', '.join(plan.order)}")
    with collector_paused():  # heavy imports (Ray, MLflow) only once the job file is known good
        from kdpipe.driver.runner import run_job
        from kdpipe.driver.state import StageState
        from kdpipe.tracking import TrackingError
        from kdpipe.tracking.store import Tracker
        from kdpipe.tracking.uri import ui_hint

    from kdpipe.cli.progress import StageBars

    with StageBars(plan) as bars:
        outcomes = run_job(
            plan, force=tuple(args.force), verbose=args.verbose, on_poll=bars, on_stall=bars.warn, on_note=bars.warn
        )
    print_table(outcome_table(plan.job.name, outcomes))
    with contextlib.suppress(TrackingError, UserError):  # a store that failed has said so in the table
        tracker = Tracker(plan.job.tracking.uri)
        experiment = tracker.experiment_id(plan.job.tracking.experiment)
        console.print(f"the runs in MLflow's UI: {ui_hint(tracker.uri, experiment)}", highlight=False, soft_wrap=True)
    for outcome in outcomes.values():
        if outcome.chosen:
            chosen = chosen_values(outcome.chosen)
            console.print(f"{outcome.name}: searched, chose {chosen}", highlight=False, soft_wrap=True)
    for outcome in outcomes.values():
        if outcome.error and outcome.status != StageState.REUSED:
            err_console.print(f"[red]{outcome.name}[/]: {outcome.error}", highlight=False, soft_wrap=True)
    return 0 if all(o.finished for o in outcomes.values()) else 1


def cmd_data(args: argparse.Namespace) -> int:
    from kdpipe.data.convert import convert
    from kdpipe.data.shards import MANIFEST, read_manifest, verify_shards

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
    from kdpipe.job.spec import JobSpec
    from kdpipe.plan import load_plan, plan_job
    from kdpipe.tracking import TrackingError
    from kdpipe.tracking.store import Tracker

    if Path(args.job).is_file():
        plan = load_plan(args.job, settings=args.settings)
        return plan, Tracker(plan.job.tracking.uri)
    tracker = Tracker(args.tracking_uri)
    try:
        job = JobSpec.model_validate_json(tracker.read_text(args.job, "job.json"))
    except TrackingError:
        raise UserError(f"{args.job}: neither a job file nor a kdpipe job run in {tracker.uri}") from None
    return plan_job(job), tracker


def cmd_status(args: argparse.Namespace) -> int:
    with collector_paused():  # MLflow's import
        from kdpipe.driver.state import StageState
        from kdpipe.driver.status import job_status
        from kdpipe.tracking import TrackingError

    plan, tracker = job_and_tracker(args)
    try:
        rows = job_status(plan, tracker, tracker.experiment_id(plan.job.tracking.experiment))
    except TrackingError as err:
        raise UserError(str(err)) from None
    table = status_table(f"kdpipe job '{plan.job.name}' in {tracker.uri}", rows)
    if any(row.state == StageState.OUTDATED for row in rows):
        table.caption = "outdated: its run was trained with an older fingerprint; the next 'kdpipe run' trains it again"
    print_table(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    with collector_paused():  # MLflow's import
        from kdpipe.driver.report import finished_metrics, job_results, log_report, report_rows
        from kdpipe.plan import check_baseline
        from kdpipe.tracking import TrackingError

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
    right = tuple(column for column in header if column not in ("stage", "method", "teachers"))
    table = table_of(f"{title} in {tracker.uri}", header, right, rows)
    table.caption = (
        "val top-1 and top-5 of each stage's final weights (result: best: its best epoch's), mean ± std over its seeds"
    )
    print_table(table)
    if text is None:
        err_console.print(f"no run of job '{plan.job.name}' in {tracker.uri} yet: nothing to report")
        return 0
    if args.markdown:
        args.markdown.write_text(text)
    console.print(f"logged report.md and report.png into job run {job_run.info.run_id}", highlight=False)
    return 0


def stage_and_model(args: argparse.Namespace, tracker, plan) -> tuple[str, str]:
    """The stage run and logged model JOB [STAGE] names: a job file and a stage, a stage's run id, or a
    `models:/` URI (which has no stage run)."""
    from kdpipe.driver.deploy import run_model, stage_model

    if plan is not None:
        return stage_model(plan, tracker, named_stage(args, plan))
    if args.job.startswith("models:/"):
        return "", args.job
    return args.job, run_model(tracker, args.job)


def named_stage(args: argparse.Namespace, plan) -> str:
    """The STAGE a model command names, which a job file needs."""
    if not args.stage:
        raise UserError(f"STAGE: name a stage of {args.job}; its stages are: {', '.join(plan.order)}")
    return args.stage


def model_source(args: argparse.Namespace):
    """The plan (None unless JOB is a job file) and MLflow store of the model commands."""
    from kdpipe.plan import load_plan
    from kdpipe.tracking.store import Tracker

    if Path(args.job).is_file():
        plan = load_plan(args.job, settings=args.settings)
        return plan, Tracker(plan.job.tracking.uri)
    return None, Tracker(args.tracking_uri)


def cmd_register(args: argparse.Namespace) -> int:
    with collector_paused():
        from kdpipe.driver.deploy import register_stage

    plan, tracker = model_source(args)
    if plan is None:
        raise UserError(f"{args.job}: register needs the job file and a stage")
    run_id, version = register_stage(plan, tracker, named_stage(args, plan), args.name, args.alias)
    console.print(
        f"registered run {run_id} as {args.name} version {version}, alias '{args.alias}': "
        f"models:/{args.name}@{args.alias}",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with collector_paused():
        from kdpipe.driver.deploy import export_model
        from kdpipe.models.export import FORMATS

    if args.format not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got '{args.format}'")
    plan, tracker = model_source(args)
    _, model_uri = stage_and_model(args, tracker, plan)
    path, difference = export_model(tracker, model_uri, args.format, args.out)
    checked = "" if difference is None else f"; onnxruntime's largest logit difference from torch: {difference:.2e}"
    console.print(f"wrote {path}{checked}", highlight=False, soft_wrap=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    with collector_paused():
        from kdpipe.driver.deploy import evaluate_model

    plan, tracker = model_source(args)
    run_id, model_uri = stage_and_model(args, tracker, plan)
    if not run_id:
        raise UserError(f"{args.job}: eval logs under a stage's run; give the job file and stage, or the run id")
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=None)
        progress = functools.partial(bar.update, task)
        result, eval_run = evaluate_model(tracker, run_id, model_uri, args.data, args.split, progress)
    print_table(eval_table(f"{args.data} ({args.split}), {len(result.labels)} images", result))
    console.print(f"logged into eval run {eval_run} under stage run {run_id}", highlight=False, soft_wrap=True)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from kdpipe.methods import METHODS

    table = methods_table(METHODS)
    print_table(table)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from kdpipe import cluster
    from kdpipe.plan import load_plan

    # Everything but the data path is checked here, before the cluster is contacted; the path is the cluster's
    # (its shared storage, a bucket), and a missing one fails the job there, in one line of its log.
    job = load_plan(args.job, check_paths=False, settings=args.settings).job
    with cluster.session(args.address) as client:
        job_id = cluster.submit(client, args.job, job, args.storage, args.tracking_uri, args.settings)
    print(job_id)
    err_console.print(f"follow it with: kdpipe logs --follow {job_id}", highlight=False)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from kdpipe import cluster

    with cluster.session(args.address) as client:
        jobs = cluster.kdpipe_jobs(client)
    table = jobs_table(jobs, cluster.METADATA_JOB)
    print_table(table)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from kdpipe import cluster

    with cluster.session(args.address) as client:
        if not args.follow:
            sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        status = cluster.follow_logs(client, args.job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    err_console.print(f"{args.job_id}: {status.value}", highlight=False)
    return 0 if status.value == "SUCCEEDED" else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from kdpipe import cluster

    with cluster.session(args.address) as client:
        status = cluster.stop(client, args.job_id)
    console.print(f"{args.job_id}: {status.value}", highlight=False)
    return 0 if status.is_terminal() else 1


COMMANDS = {
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
    "register": cmd_register,
    "export": cmd_export,
    "eval": cmd_eval,
}
