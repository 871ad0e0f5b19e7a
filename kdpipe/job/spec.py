"""The job file's schema: a typed `JobSpec` of typed stages.

Knows no runtime (no torch, Ray or MLflow), so `kdpipe validate` checks a file's shape without them. Unknown keys,
non-finite floats and out-of-range numbers are validation errors (`kdpipe.job.load` words them as one line).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DataSource = Literal["synthetic", "imagefolder", "cifar", "fashion-mnist", "shards"]
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
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
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="shards: where images are decoded and augmented: in the loader workers (cpu), or in batches "
        "where the model runs, the workers reading bytes only (gpu; on a machine without one, the CPU); auto: gpu "
        "on CUDA",
    )
    bad_samples: Literal["fail", "skip"] = Field(
        "fail",
        description="shards: a missing or unreadable shard or an undecodable image stops the stage (fail), or is "
        "skipped and counted in the stage's data/skipped metric (skip)",
    )
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="synthetic: the generator's seed")

    def reading(self) -> dict:
        """The settings that change which samples a stage sees, in which order and how: the shard reader and
        ImageFolder's loader deal each epoch's samples out by loader worker, so their count matters there."""
        reading = self.model_dump(include={"batch_size", "image_size", "augment", "bad_samples"})
        if self.source in ("synthetic", "shards", "imagefolder"):
            reading["loader_workers"] = self.loader_workers
        return reading

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
    start_timeout: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="seconds the workers may wait to be placed before the stage (or one trial) fails; default "
        "300, or 1800 on a cluster joined by RAY_ADDRESS (it may be growing)",
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


WEIGHT_SOURCES = ("torchvision", "timm", "file", "mlflow")
MLFLOW_URI = r"^(runs:/[^/]+/.+|models:/[^/@]+/\d+|models:/[^/@]+@[^/]+)$"


RGB = Annotated[list[Annotated[float, Field(ge=-1000, le=1000)]], Field(min_length=3, max_length=3)]


class InitSpec(Strict):
    """Where a stage's weights start, and for a file or an MLflow model the input they expect (a hub's weights
    state their own). Given as a mapping, or as the `weights` string alone."""

    weights: str = Field(
        pattern=rf"^({'|'.join(WEIGHT_SOURCES)}):.+",
        max_length=4096,
        description="torchvision:<Weights enum> (ResNet50_Weights.IMAGENET1K_V2), timm:<name>[.<tag>] from the "
        "Hugging Face Hub, file:<.safetensors, .pt, .pth or .bin state dict>, or mlflow:runs:/<id>/<path>, "
        "mlflow:models:/<name>/<version>, mlflow:models:/<name>@<alias>",
    )
    mean: RGB | None = Field(None, description="file, mlflow: the per-channel mean the weights were trained with")
    std: RGB | None = Field(None, description="file, mlflow: the per-channel std the weights were trained with")
    image_size: int | None = Field(None, ge=8, le=4096, description="file, mlflow: the image side they expect")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return {"weights": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _input(self) -> InitSpec:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean, std: give both or neither")
        if any(value <= 0 for value in self.std or ()):
            raise ValueError("std: expected values above 0")
        if self.kind in ("torchvision", "timm") and (self.mean or self.image_size):
            raise ValueError(f"mean, std, image_size: {self.kind}'s weights state their own; only for file: or mlflow:")
        return self

    @model_validator(mode="after")
    def _mlflow_uri(self) -> InitSpec:
        if self.kind == "mlflow" and not re.match(MLFLOW_URI, self.ref):
            raise ValueError(
                "weights: expected mlflow:runs:/<run id>/<path>, mlflow:models:/<name>/<version> or "
                f"mlflow:models:/<name>@<alias>, got '{self.weights}'"
            )
        return self

    @property
    def kind(self) -> str:
        return self.weights.split(":", 1)[0]

    @property
    def ref(self) -> str:
        return self.weights.split(":", 1)[1]


# `register` is the name a user writes; it shadows only the `register` every class of abstract bases has.
warnings.filterwarnings("ignore", 'Field name "register" in "StageSpec" shadows', UserWarning)


class StageSpec(Strict):
    name: str = Field(pattern=NAME, max_length=100)
    model: str = Field(
        max_length=100, description="resnet8..resnet110, resnet8x4, resnet32x4, a torchvision model, or timm:<name>"
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict,
        max_length=64,
        description="the model constructor's other options, e.g. {img_size: 32} for a timm ViT",
    )
    init: InitSpec | None = Field(None, description="where its weights start (default: random)")
    teachers: list[str] = Field(
        default_factory=list, max_length=64, description="earlier stages whose final weights it learns from"
    )
    method: str = Field("ce", max_length=100)
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    epochs: int = Field(ge=0, le=100_000, description="0: import `init`'s weights as they are, and evaluate them")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    search: SearchSpec | None = Field(None, description="search this stage's hyperparameters with Ray Tune")
    seeds: Seeds | None = Field(
        None, description="train this stage once per seed (default: the job's seeds); a teacher of one seed teaches all"
    )
    teacher_cache: TeacherCacheMode | None = Field(None, description="the job's teacher_cache for this stage alone")
    result: Literal["last", "best"] = Field(
        "last", description="the final weights: the last epoch's, or the best epoch's by val/top1"
    )
    register: str | None = Field(
        None,
        pattern=r"^[^/:'\"]+$",  # MLflow refuses / and :, and quotes would break its search filters
        max_length=200,
        description="register the stage's model under this name in the MLflow Model Registry",
    )

    @model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        distinct(self.seeds, "seeds")
        if self.epochs == 0:
            self._importable()
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

    def _importable(self) -> None:
        """A stage of no epochs imports its `init` weights: it learns nothing, so it has no teachers or search."""
        if self.init is None:
            raise ValueError("epochs: 0 imports weights without training; say where they come from in init:")
        if self.teachers or self.method != "ce" or self.search is not None:
            raise ValueError("epochs: 0 imports weights without training; it takes no teachers, method or search")


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
    stall_minutes: float = Field(
        30.0,
        ge=0,
        le=525_600,
        description="say so (and what is pending) when no stage, step or trial moved for this long (0: never)",
    )

    @model_validator(mode="after")
    def _distinct_seeds(self) -> JobSpec:
        distinct(self.seeds, "seeds")
        return self


def workdir_path(workdir: str, name: str) -> str:
    """WORKDIR/name: a local folder (absolute: workers run elsewhere) or a URL."""
    if "://" in workdir:
        return f"{workdir.rstrip('/')}/{name}"
    return str(Path(workdir).resolve() / name)
