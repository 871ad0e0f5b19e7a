"""The `kdpipe` command line: its commands, their arguments and their help."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


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
    add_model_commands(commands)
    add_cluster_commands(commands)
    return parser


def add_model_commands(commands) -> None:
    """register, export, eval: a finished stage's MLflow Model, after training."""
    register = commands.add_parser(
        "register",
        help="register a finished stage's model in the MLflow Model Registry",
        description="Create a version of registered model NAME from STAGE's logged model (the run 'kdpipe run' "
        "would reuse), tagged with the job, stage, fingerprint, teachers and top-1, and give it an alias. A stage "
        "already registered under NAME keeps its version. Serve it with: mlflow models serve -m "
        "models:/NAME@candidate --env-manager local",
    )
    add_job_or_run(register, stage=True)
    register.add_argument("name", help="the registered model's name")
    register.add_argument("--alias", default="candidate", help="the alias the version gets (default: candidate)")
    export = commands.add_parser(
        "export",
        help="write a finished stage's network as ONNX, TorchScript or safetensors",
        description="Write the network of STAGE's logged model into OUT, with preprocessing.json (class names, "
        "resize, crop, mean, std): each format takes the normalized N x 3 x crop x crop batch. ONNX has a dynamic "
        "batch axis and is checked against onnxruntime (the largest logit difference is printed; above 1e-4 the "
        "export fails); it needs the onnx extra. JOB may also be a stage's MLflow run id or a models:/ URI.",
    )
    add_job_or_run(export, stage=True)
    export.add_argument("--format", default="onnx", help="onnx, torchscript or safetensors (default: onnx)")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write")
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a finished stage's model on a split of any data set",
        description="Run STAGE's logged model (preprocessing included, as served) over every image of a split of "
        "--data, whose classes must be the model's (matched by name, in any order). Prints top-1, top-5, the "
        "expected calibration error (15 bins) and each class's accuracy, and logs them, a confusion matrix and a "
        "reliability diagram into an MLflow run nested under the stage's. JOB may also be a stage's run id.",
    )
    add_job_or_run(evaluate, stage=True)
    evaluate.add_argument(
        "--data",
        required=True,
        metavar="SOURCE:PATH",
        help="imagefolder:DIR (split folders of class folders), shards:DIR (written by 'kdpipe data shard'), "
        "cifar:DIR or fashion-mnist:DIR",
    )
    evaluate.add_argument("--split", default="val", help="the split to read (default: val)")


def add_job_or_run(parser: argparse.ArgumentParser, stage: bool = False) -> None:
    """The JOB of `status`, `report` and the model commands: a job file (with `--set`s) or a run's id (in
    --tracking-uri); `stage`: a STAGE of the job follows (omitted when JOB names a stage's run or model)."""
    if stage:
        parser.add_argument("job", help="the job file (YAML), a stage's MLflow run id, or a models:/ URI")
        parser.add_argument("stage", nargs="?", help="the stage (required with a job file)")
    else:
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
