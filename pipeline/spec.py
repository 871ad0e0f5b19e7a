"""The job file: YAML in, a typed `JobSpec` out.

This module knows no runtime (no torch, Ray or MLflow), so `kdpipe validate` is instant. Every problem becomes a
`UserError` of one line naming the file, the field and what was expected.
"""

from __future__ import annotations

import copy
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError

DataSource = Literal["synthetic", "imagefolder", "cifar", "fashion-mnist", "shards"]
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# What a job file may hold at most, so that no file makes kdpipe hang or exhaust memory: its size, its nesting
# and the number of values once YAML aliases are expanded (a few kilobytes of anchors can expand to billions).
MAX_JOB_BYTES, MAX_NESTING, MAX_VALUES = 1 << 20, 64, 100_000
SEED_LIMIT = 2**32  # seeds go to torch, numpy and Python's random: below 2^32 all of them take it


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a job file must never be silently ignored. Floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataSpec(Strict):
    source: DataSource
    path: str | None = Field(
        None,
        description="synthetic: where the generated images and shards are written; "
        "imagefolder: a folder with train/ and val/ class folders; cifar: torchvision's CIFAR root; "
        "fashion-mnist: the folder of IDX .gz files; shards: a folder written by 'kdpipe data shard', "
        "or its URL (https://, gs://, s3://)",
    )
    classes: int = Field(10, ge=2, le=100_000, description="synthetic: number of classes; cifar: 10 or 100")
    image_size: int = Field(32, ge=8, le=4096, description="side of the square images the models see")
    train_size: int = Field(2000, ge=1, le=10_000_000, description="synthetic: training images")
    val_size: int = Field(500, ge=1, le=10_000_000, description="synthetic: held-out images")
    train_subset: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="cifar, fashion-mnist: train on the first N training samples only (their files are in a "
        "shuffled order); part of the data's identity",
    )
    shard_size: int = Field(500, ge=1, le=1_000_000, description="synthetic: samples per tar shard")
    batch_size: int = Field(64, ge=1, le=65_536, description="samples per worker per step")
    augment: bool = Field(True, description="random crop and flip for training (off: evaluation transforms)")
    loader_workers: int = Field(1, ge=0, le=256, description="DataLoader processes per training worker")
    bad_samples: Literal["fail", "skip"] = Field(
        "fail",
        description="shards: a missing or unreadable shard or an undecodable image stops the stage (fail), or is "
        "skipped and counted in the stage's data/skipped metric (skip)",
    )
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="synthetic: the generator's seed")

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
    uri: str = Field(
        "sqlite:///mlflow.db", max_length=4096, description="MLflow tracking URI; sqlite keeps artifacts beside it"
    )
    experiment: str = Field("kdpipe", min_length=1, max_length=256)


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)


class ScheduleSpec(Strict):
    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, le=100_000)
    milestones: list[int] = Field(
        default_factory=list, max_length=1000, description="step: epochs (from 1) after which lr *= gamma"
    )
    gamma: float = Field(0.1, gt=0, le=1)


class DeepSpeedSpec(Strict):
    zero_stage: Literal[0, 1, 2] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_clipping: float = Field(0.0, ge=0, le=1e6)


class WorkersSpec(Strict):
    count: int = Field(2, ge=1, le=4096, description="Ray Train workers (data-parallel ranks)")
    cpus: float = Field(1.0, gt=0, le=1024)
    gpus: float = Field(0.0, ge=0, le=64)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement strategy of the workers: PACK fills a node first (fast collectives), SPREAD "
        "spreads them over nodes where it can, STRICT_* insist",
    )


class Dimension(Strict):
    """One searched value: `uniform`/`loguniform`/`int` between `low` and `high` (both included), or `choice` among
    `values`."""

    distribution: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = Field(None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _bounds(self) -> Dimension:
        kind = self.distribution
        if kind == "choice":
            if self.values is None or self.low is not None or self.high is not None:
                raise ValueError("choice takes values: [a, b, ...], and no low or high")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"{kind} takes low and high, and no values")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        if kind == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("int takes whole numbers for low and high")
        return self


class SchedulerSpec(Strict):
    name: Literal["asha", "none"] = Field("asha", description="asha: stop poor trials at epoch boundaries")
    grace_period: int = Field(1, ge=1, le=100_000, description="epochs every trial trains before it can be stopped")
    reduction_factor: float = Field(4.0, gt=1, le=100, description="ASHA keeps the best 1/reduction_factor per rung")


class SearchSpec(Strict):
    """A Ray Tune search over the stage's own config: each trial is the stage with sampled values."""

    space: dict[str, Dimension] = Field(
        min_length=1, max_length=64, description="dotted paths into the stage (params.temperature, optimizer.lr, ...)"
    )
    trials: int = Field(ge=1, le=10_000)
    metric: str = Field("val/top1", pattern=r"^(val|train)/[A-Za-z0-9_./]+$", max_length=200)
    mode: Literal["max", "min"] = "max"
    searcher: Literal["tpe", "random"] = Field("tpe", description="tpe: Optuna's TPE; random: random sampling")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent: int | None = Field(
        None, ge=1, le=10_000, description="trials at once (default: as many as the cluster holds at once)"
    )
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)


Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
Seeds = Annotated[list[Seed], Field(min_length=1, max_length=100)]


class TopKCache(Strict):
    """FKD's soft labels in the teacher-output cache: an approximation, so part of the fingerprint of each stage
    that reads it."""

    top_k: int = Field(ge=1, le=100_000, description="logits kept per image; the other classes share what they leave")


TeacherCacheMode = Literal["auto", "off"] | TopKCache


def distinct(seeds: list[int] | None, field: str) -> None:
    if seeds and len(set(seeds)) < len(seeds):
        raise ValueError(f"{field}: each seed once")


class StageSpec(Strict):
    name: str = Field(pattern=NAME, max_length=100)
    model: str = Field(max_length=100)
    teachers: list[str] = Field(
        default_factory=list, max_length=64, description="earlier stages whose final weights it learns from"
    )
    method: str = Field("ce", max_length=100)
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    epochs: int = Field(ge=1, le=100_000)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    search: SearchSpec | None = Field(None, description="search this stage's hyperparameters with Ray Tune")
    seeds: Seeds | None = Field(
        None, description="train this stage once per seed (default: the job's seeds); a teacher of one seed teaches all"
    )
    teacher_cache: TeacherCacheMode | None = Field(None, description="the job's teacher_cache for this stage alone")

    @model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        distinct(self.seeds, "seeds")
        schedule = self.schedule
        if schedule.warmup_epochs > self.epochs:
            raise ValueError(f"schedule.warmup_epochs: at most the stage's {self.epochs} epochs")
        if schedule.milestones != sorted(set(schedule.milestones)) or any(
            not 0 < m < self.epochs for m in schedule.milestones
        ):
            raise ValueError(f"schedule.milestones: increasing epochs between 1 and {self.epochs - 1}")
        if len(set(self.teachers)) < len(self.teachers):
            raise ValueError("teachers: each teacher once")
        if self.deepspeed.precision == "fp16" and not self.workers.gpus:
            raise ValueError(
                "deepspeed.precision: fp16 needs GPU workers (workers.gpus > 0), its kernels and loss scaling are "
                "for GPUs; use bf16 or fp32 on CPU"
            )
        return self


class CheckpointSpec(Strict):
    """How often a training stage saves its full state (to Ray Train's storage and to its MLflow run).

    Not part of any stage's fingerprint: when a stage saves changes nothing about what it learns."""

    every_steps: int = Field(0, ge=0, le=10**9, description="save every N optimizer steps (0: off)")
    every_minutes: float = Field(15.0, ge=0, le=525_600, description="save when this many minutes have passed (0: off)")
    keep: int = Field(2, ge=1, le=1000, description="checkpoints kept in the MLflow run; older ones are deleted")
    max_restarts: int = Field(
        2,
        ge=0,
        le=1000,
        description="times a stage's workers (a search's trial) restart from the latest checkpoint after a failure",
    )


class JobSpec(Strict):
    name: str = Field(pattern=NAME, max_length=100)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    seeds: Seeds | None = Field(None, description="train the whole DAG once per seed (default: [seed])")
    baseline: str | None = Field(
        None, max_length=100, description="the stage the report measures every other stage's top-1 gain against"
    )
    workdir: str = Field(
        "kdpipe-out",
        max_length=4096,
        description="where Ray Train keeps checkpoints: a folder all nodes see, or an s3:// or gs:// URL",
    )
    teacher_cache: TeacherCacheMode = Field(
        "auto",
        description="auto: students that learn from their teachers' logits alone (kd, takd, dgkd, adaptive's st and "
        "logits paths) read them from a cache under the workdir, filled as the first such student trains; exact "
        "(fp16 logits of the very views trained on), so it is in no fingerprint. {top_k: K}: only each image's K "
        "largest logits are kept (FKD's soft labels, for many classes), an approximation that is part of the "
        "fingerprint. off: the teachers run every step",
    )
    data: DataSpec
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="also saved at the end of every epoch"
    )
    stages: list[StageSpec] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _distinct_seeds(self) -> JobSpec:
        distinct(self.seeds, "seeds")
        return self


def load_job(path: str | Path, check_paths: bool = True, settings: Sequence[str] = ()) -> JobSpec:
    """Read and validate a job file, with `--set PATH=VALUE` settings applied; any problem is a one-line
    `UserError` naming the file, or the setting that caused it. `check_paths=False` leaves data paths to the
    machine that reads them (`kdpipe submit`: the cluster's shared storage, not the laptop's disk)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of job fields at the top level, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(apply_settings(raw, settings))
    except ValidationError as err:
        raise UserError(f"{blame(raw, settings, path)}: {describe_error(err)}") from None
    if check_paths:
        check_data_path(spec.data, path)
    return spec


def apply_settings(raw: dict, settings: Sequence[str]) -> dict:
    """A copy of the job file's data with each `PATH=VALUE` set: VALUE read as YAML (0.05, true, [0, 1], a word),
    PATH dotted, a stage named by its name (`stages.student.optimizer.lr`). A path that leads nowhere is a
    `UserError` naming the setting; a field the schema lacks is left for validation to name."""
    raw = copy.deepcopy(raw)
    for setting in settings:
        dotted, equals, text = setting.partition("=")
        parts = dotted.strip().split(".")
        if not equals or not all(parts):
            raise UserError(f"--set {setting}: expected PATH=VALUE, e.g. stages.student.optimizer.lr=0.05")
        value = parse_yaml(text, f"--set {dotted}")
        node: Any = raw
        for i, part in enumerate(parts):
            where = ".".join(parts[:i]) or "job"
            if isinstance(node, list):
                named = {str(item.get("name")): item for item in node if isinstance(item, dict)}
                if part not in named:
                    raise UserError(f"--set {dotted}: no '{part}' in {where}; expected one of: {', '.join(named)}")
                if i == len(parts) - 1:
                    raise UserError(f"--set {dotted}: expected a field of {where}.{part}, e.g. {dotted}.epochs")
                node = named[part]
            elif not isinstance(node, dict):
                raise UserError(f"--set {dotted}: {where} holds a single value, not fields")
            elif i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return raw


def blame(raw: dict, settings: Sequence[str], path: Path) -> str:
    """Whose mistake a validation error is: the file's, if it fails alone; else the first setting that breaks it."""
    try:
        JobSpec.model_validate(raw)
    except ValidationError:
        return str(path)
    for n in range(1, len(settings) + 1):
        try:
            JobSpec.model_validate(apply_settings(raw, settings[:n]))
        except ValidationError:
            return f"--set {settings[n - 1]}"
    return str(path)


def read_yaml(path: Path) -> Any:
    """A job file's YAML as plain data, refusing what could hang or exhaust memory: more than MAX_JOB_BYTES, text
    that is not UTF-8, and what `parse_yaml` refuses."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_JOB_BYTES + 1)
    except OSError as err:
        raise UserError(f"{path}: cannot read job file ({err.strerror})") from None
    if len(data) > MAX_JOB_BYTES:
        raise UserError(f"{path}: over {MAX_JOB_BYTES} bytes; expected a YAML job file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte {err.start} is not UTF-8; expected a YAML job file in UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as plain data, refusing nesting deeper than MAX_NESTING and more than MAX_VALUES values once
    aliases are expanded; `source` (a file, a `--set`) starts each error line."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        check_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{source}{where}: YAML syntax error: {problem}") from None
    except TooLarge as err:
        raise UserError(f"{source}: {err}; expected a job file") from None
    except RecursionError:
        raise UserError(f"{source}: YAML nested deeper than {MAX_NESTING} levels") from None
    except (ValueError, OverflowError) as err:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{source}: a value YAML cannot hold as a number ({str(err)[:120]})") from None
    finally:
        if loader is not None:
            loader.dispose()


class TooLarge(Exception):
    """YAML whose structure would take unbounded time or memory to build."""


def check_size(root: yaml.Node) -> None:
    """Refuse a YAML node graph nested deeper than MAX_NESTING, holding more than MAX_VALUES values with its
    aliases expanded, or containing itself through an alias: counted once per node, without recursion."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    open_nodes: set[int] = set()
    while stack:
        node, depth, children_done = stack.pop()
        if depth > MAX_NESTING:
            raise RecursionError
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_VALUES:
                raise TooLarge(f"more than {MAX_VALUES} values once its aliases are expanded")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise TooLarge("a YAML alias refers to a node that contains it")
        open_nodes.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children if id(child) not in sizes)


def check_data_path(data: DataSpec, job_path: Path) -> None:
    if data.source != "synthetic" and not is_url(data.path) and not Path(data.path).exists():
        raise UserError(f"{job_path}: data.path: no such file or folder '{data.path}' (source '{data.source}')")


def describe_error(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first pydantic error as `field.path: what was expected (got ...)`; `model` is what was validated (the
    job, by default), for the fields an unknown one could have been."""
    first = err.errors()[0]
    loc = first["loc"]
    where = field_path(loc)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(allowed_fields(loc[:-1], model or JobSpec)))
        return f"{where}: unknown field; expected one of: {allowed}"
    if first["type"] == "missing":
        return f"{where}: required field is missing"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return message
    return f"{where}: {message} (got {short_repr(first['input'])})"


def short_repr(value: Any, limit: int = 80) -> str:
    """A value as the error line shows it: never longer than `limit` characters, whatever the file held."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        text = f"an integer of over {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "job"


def allowed_fields(loc: tuple, model: Any) -> list[str]:
    """The field names a model accepts at `loc`, walking the schema from `model`."""
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
