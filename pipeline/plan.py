"""Everything about a job that can be checked without running it: the DAG, the models, methods and their params."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline import dag
from pipeline.errors import UserError
from pipeline.methods import get_method, parse_params
from pipeline.models import is_known_model
from pipeline.spec import DataSpec, JobSpec, StageSpec, describe_error, load_job, short_repr


@dataclass(frozen=True)
class PlannedStage:
    spec: StageSpec
    params: BaseModel  # the method's params with defaults filled in
    method_version: int

    @property
    def config(self) -> dict:
        """The resolved stage config: what MLflow records as params."""
        resolved = self.spec.model_dump()
        resolved["params"] = self.params.model_dump()
        return resolved

    def identity(self, job: JobSpec) -> dict:
        """What this stage learns from, apart from its teachers and the data's content: its resolved config, the
        job's seed, the data settings that decide which samples it sees and how, its method's version. Where and
        on what its workers run (placement, CPUs, GPUs) changes nothing it learns; their count sets the global
        batch and stays."""
        resolved = self.config
        resolved["workers"] = resolved["workers"]["count"]
        return {
            "stage": resolved,
            "seed": job.seed,
            "reading": reading_settings(job.data),
            "method_version": self.method_version,
        }


def reading_settings(data: DataSpec) -> dict:
    """The data settings that change which samples a stage sees, in which order and how: the shard reader and
    ImageFolder's loader deal each epoch's samples out by loader worker, so their count matters there."""
    reading = data.model_dump(include={"batch_size", "image_size", "augment", "bad_samples"})
    if data.source in ("synthetic", "shards", "imagefolder"):
        reading["loader_workers"] = data.loader_workers
    return reading


@dataclass(frozen=True)
class Plan:
    job: JobSpec
    order: list[str]  # teachers before students
    stages: dict[str, PlannedStage]

    def fingerprints(self, data_id: str) -> dict[str, str]:
        prints: dict[str, str] = {}
        for name in self.order:
            stage = self.stages[name]
            upstream = [prints[t] for t in stage.spec.teachers]
            prints[name] = dag.fingerprint(stage.identity(self.job), upstream, data_id)
        return prints

    def downstream(self, name: str) -> set[str]:
        """`name` and every stage that learns from it, directly or through others."""
        found = {name}
        for stage in self.order:
            if found.intersection(self.stages[stage].spec.teachers):
                found.add(stage)
        return found


def plan_job(job: JobSpec) -> Plan:
    order = dag.topological_order(job.stages)
    stages = {}
    for i, stage in enumerate(job.stages):
        stages[stage.name] = plan_stage(stage, f"stages[{i}]")
        if stage.search is not None:
            check_search(stages[stage.name], f"stages[{i}].search.space")
    return Plan(job, order, stages)


def plan_stage(stage: StageSpec, where: str) -> PlannedStage:
    """A stage checked against the model and method registries, with its method's params resolved."""
    if not is_known_model(stage.model):
        raise UserError(
            f"{where}.model: unknown model '{stage.model}'; expected a torchvision model name "
            "or resnet8..resnet110, resnet8x4, resnet32x4"
        )
    method = get_method(stage.method, f"{where}.method")
    count, low, high = len(stage.teachers), method.min_teachers, method.max_teachers
    if count < low or (high is not None and count > high):
        wanted = f"at least {low}" if high is None else (f"{low}" if low == high else f"{low} to {high}")
        raise UserError(f"{where}.teachers: method '{method.name}' takes {wanted} teacher(s), got {count}")
    params = parse_params(method, stage.params, f"{where}.params")
    problem = method.check(params, count)
    if problem:
        raise UserError(f"{where}.params.{problem}")
    return PlannedStage(stage, params, method.version)


UNSEARCHABLE = ("name", "teachers", "method", "workers", "search")  # what a stage is, not how it trains


def with_values(stage: StageSpec, values: dict[str, Any]) -> PlannedStage:
    """The stage with the searched `values` set at their dotted paths (a trial, with no search of its own),
    checked like the job file: a `UserError` naming the path if one is unknown, of the wrong type or out of
    range."""
    raw = stage.model_dump(exclude={"search"})
    for path, value in values.items():
        if path.split(".")[0] in UNSEARCHABLE:
            raise UserError(f"{path}: not searchable; a trial is the same stage with other hyperparameters")
        target = raw
        *parents, key = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UserError(f"{path}: '{part}' holds a single value, not fields")
        target[key] = value
    try:
        return plan_stage(StageSpec.model_validate(raw), "stage")
    except ValidationError as err:
        raise UserError(describe_error(err, StageSpec)) from None


def value_at(config: dict, path: str) -> Any:
    for part in path.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def check_search(stage: PlannedStage, where: str) -> None:
    """Every searched path names a number of the stage (or, for `choice`, a field each choice is valid for): each
    bound and each choice is set in turn and the stage checked as a trial would be."""
    for path, dimension in stage.spec.search.space.items():
        candidates = dimension.values or [dimension.low, dimension.high]
        if dimension.distribution == "int":
            candidates = [int(value) for value in candidates]
        for value in candidates:
            try:
                trial = with_values(stage.spec, {path: value})
            except UserError as err:  # the detail, without the field path it starts with
                detail = str(err).split(": ", 1)[-1]
                raise UserError(f"{where}.{path}: {detail} (searching {short_repr(value)})") from None
            found = value_at(trial.config, path)
            if found is None:
                raise UserError(f"{where}.{path}: unknown field of the stage")
            if dimension.distribution != "choice" and (isinstance(found, bool) or not isinstance(found, int | float)):
                raise UserError(
                    f"{where}.{path}: not a number of the stage ({short_repr(found)}); expected a path to a number "
                    "such as params.temperature or optimizer.lr"
                )


def load_plan(path: str | Path, check_paths: bool = True) -> Plan:
    """Load, validate and plan a job file; every problem is a one-line `UserError` naming the file.
    `check_paths=False` leaves data paths to the machine that will read them."""
    job = load_job(path, check_paths)
    try:
        return plan_job(job)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
