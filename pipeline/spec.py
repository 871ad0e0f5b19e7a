"""The job file: YAML in, a typed `JobSpec` out.

This module knows no runtime (no torch, Ray or MLflow), so `kdpipe validate` is instant. Every problem becomes a
`UserError` of one line naming the file, the field and what was expected.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from pipeline.errors import UserError

DataSource = Literal["synthetic", "imagefolder", "cifar", "fashion-mnist", "shards"]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a job file must never be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    source: DataSource
    path: str | None = Field(
        None,
        description="synthetic: where the generated images and shards are written; "
        "imagefolder: a folder with train/ and val/ class folders; cifar: torchvision's CIFAR root; "
        "fashion-mnist: the folder of IDX .gz files; shards: a folder written by 'kdpipe data shard', "
        "or its URL (https://, gs://, s3://)",
    )
    classes: PositiveInt = Field(10, description="synthetic: number of classes; cifar: 10 or 100")
    image_size: PositiveInt = Field(32, description="side of the square images the models see")
    train_size: PositiveInt = Field(2000, description="synthetic: training images")
    val_size: PositiveInt = Field(500, description="synthetic: held-out images")
    train_subset: PositiveInt | None = Field(
        None,
        description="cifar, fashion-mnist: train on the first N training samples only (their files are in a "
        "shuffled order); part of the data's identity",
    )
    shard_size: PositiveInt = Field(500, description="synthetic: samples per tar shard")
    batch_size: PositiveInt = Field(64, description="samples per worker per step")
    augment: bool = Field(True, description="random crop and flip for training (off: evaluation transforms)")
    loader_workers: NonNegativeInt = Field(1, description="DataLoader processes per training worker")
    bad_samples: Literal["fail", "skip"] = Field(
        "fail",
        description="shards: a missing or unreadable shard or an undecodable image stops the stage (fail), or is "
        "skipped and counted in the stage's data/skipped metric (skip)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _path_needed(self) -> DataSpec:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for source '{self.source}'")
        if self.source == "cifar" and self.classes not in (10, 100):
            raise ValueError("data.classes must be 10 or 100 for source 'cifar'")
        if self.train_subset and self.source not in ("cifar", "fashion-mnist"):
            raise ValueError(f"data.train_subset: only for sources cifar and fashion-mnist, not '{self.source}'")
        if self.path and is_url(self.path):
            if self.path.split(":", 1)[0] not in URL_SCHEMES:
                # webdataset runs pipe: URLs through a shell; nothing from a job file goes to a shell
                raise ValueError(f"data.path: expected a folder or a {'/'.join(URL_SCHEMES)} URL, got '{self.path}'")
            if self.source != "shards":
                raise ValueError(f"data.path: a URL is only read for source 'shards', not '{self.source}'")
        return self


URL_SCHEMES = ("https", "http", "gs", "s3")  # read through curl, gsutil and the aws CLI, given argument lists


def is_url(path: str) -> bool:
    """`pipe:...` counts as a URL too, so that it is refused rather than taken for a relative folder."""
    return "://" in path or path.startswith("pipe:")


class TrackingSpec(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; sqlite keeps artifacts beside the file")
    experiment: str = "kdpipe"


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4


class ScheduleSpec(Strict):
    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: NonNegativeFloat = 0.0
    milestones: list[PositiveInt] = Field(
        default_factory=list, description="step: epochs (from 1) after which lr *= gamma"
    )
    gamma: PositiveFloat = 0.1


class DeepSpeedSpec(Strict):
    zero_stage: Literal[0, 1, 2] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_clipping: NonNegativeFloat = 0.0


class WorkersSpec(Strict):
    count: PositiveInt = Field(2, description="Ray Train workers (data-parallel ranks)")
    cpus: PositiveFloat = 1.0
    gpus: NonNegativeFloat = 0.0
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement strategy of the workers: PACK fills a node first (fast collectives), SPREAD "
        "spreads them over nodes where it can, STRICT_* insist",
    )


class StageSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    teachers: list[str] = Field(default_factory=list, description="earlier stages whose final weights it learns from")
    method: str = "ce"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    epochs: PositiveInt
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> StageSpec:
        if self.deepspeed.precision == "fp16" and not self.workers.gpus:
            raise ValueError(
                "deepspeed.precision: fp16 needs GPU workers (workers.gpus > 0), DeepSpeed has none on CPU; "
                "use bf16 or fp32"
            )
        return self


class CheckpointSpec(Strict):
    """How often a training stage saves its full state (to Ray Train's storage and to its MLflow run).

    Not part of any stage's fingerprint: when a stage saves changes nothing about what it learns."""

    every_steps: NonNegativeInt = Field(0, description="save every N optimizer steps (0: off)")
    every_minutes: NonNegativeFloat = Field(15.0, description="save when this many minutes have passed (0: off)")
    keep: PositiveInt = Field(2, description="checkpoints kept in the MLflow run; older ones are deleted")
    max_restarts: NonNegativeInt = Field(
        2, description="times Ray Train restarts a stage's workers from the latest checkpoint after a failure"
    )


class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    workdir: str = Field(
        "kdpipe-out", description="where Ray Train keeps checkpoints: a folder all nodes see, or an s3:// or gs:// URL"
    )
    data: DataSpec
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="also saved at the end of every epoch"
    )
    stages: list[StageSpec] = Field(min_length=1)


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file; any problem is a one-line `UserError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read job file ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of job fields at the top level, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: {describe_error(err)}") from None
    check_data_path(spec.data, path)
    return spec


def check_data_path(data: DataSpec, job_path: Path) -> None:
    if data.source != "synthetic" and not is_url(data.path) and not Path(data.path).exists():
        raise UserError(f"{job_path}: data.path: no such file or folder '{data.path}' (source '{data.source}')")


def describe_error(err: ValidationError) -> str:
    """The first pydantic error as `field.path: what was expected (got ...)`."""
    first = err.errors()[0]
    loc = first["loc"]
    where = field_path(loc)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(allowed_fields(loc[:-1])))
        return f"{where}: unknown field; expected one of: {allowed}"
    if first["type"] == "missing":
        return f"{where}: required field is missing"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return message
    return f"{where}: {message} (got {first['input']!r})"


def field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "job"


def allowed_fields(loc: tuple) -> list[str]:
    """The field names a model accepts at `loc`, walking the schema from JobSpec."""
    model: Any = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `list[X]`, `X | None` or `X`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
