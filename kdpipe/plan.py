"""A job planned: its stages checked against the model and method registries, each method's params resolved, one
planned stage per seed, and each stage's fingerprint. Everything `kdpipe validate` checks without running anything.

It sits above `kdpipe.job` (which knows no torch) because a method's params are defined beside its loss.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn

from kdpipe.data import data_identity
from kdpipe.errors import UserError
from kdpipe.job import cache_policy, dag
from kdpipe.job.describe import describe_error, short_repr
from kdpipe.job.dotted import PathError, get_at, set_at
from kdpipe.job.load import load_job
from kdpipe.job.spec import JobSpec, StageSpec, TeacherCacheMode
from kdpipe.methods import METHODS, get_method, parse_params
from kdpipe.models import build_model, is_known_model, shapes_only
from kdpipe.models.sources import STATE_SUFFIXES, timm_config, torchvision_weights


@dataclass(frozen=True)
class PlannedStage:
    spec: StageSpec  # as it runs: a repeat's name carries its seed (`student-s1`), and so do its teachers'
    params: BaseModel  # the method's params with defaults filled in
    method_version: int
    seed: int = 0
    source: StageSpec | None = None  # as the job file has it, when `spec` is one of its repeats

    @property
    def config(self) -> dict:
        """The resolved stage config: what MLflow records as params."""
        return self.resolved(self.spec)

    def resolved(self, spec: StageSpec) -> dict:
        resolved = spec.model_dump()
        resolved["params"] = self.params.model_dump()
        return resolved

    def identity(self, job: JobSpec, digest: str = "") -> dict:
        """What this stage learns from, apart from its teachers and the data's content: its resolved config as
        the job file has it (imported weights as their content's `digest`, never their path or URI), its seed, the
        data settings that decide which samples it sees and how, its method's version. Where and on what its
        workers run (placement, CPUs, GPUs) changes nothing it learns; their count sets the global batch and stays.
        How many repeats there are is not what one repeat learns from: seed 0 of `seeds: [0, 1, 2]` is the run of
        a single-seed job with seed 0."""
        resolved = self.resolved(self.source or self.spec)
        resolved.pop("seeds")
        resolved.pop("teacher_cache")
        resolved.pop("register")  # where the model is published changes nothing it learns
        if resolved["result"] == "last":  # absent for the default, as before the field existed
            resolved.pop("result")
        if not resolved["model_args"]:  # absent when empty, as before the field existed
            resolved.pop("model_args")
        init = resolved.pop("init")
        if init is not None:  # absent, not None, without one: older stages keep their fingerprint
            resolved["init"] = {**{k: v for k, v in init.items() if v is not None}, "weights": digest}
        cache = cache_policy.fingerprint_part(self.teacher_cache(job))
        if cache is not None:
            resolved["teacher_cache"] = cache
        resolved["workers"] = resolved["workers"]["count"]
        return {
            "stage": resolved,
            "seed": self.seed,
            "reading": job.data.reading(),
            "method_version": self.method_version,
        }

    def teacher_cache(self, job: JobSpec) -> TeacherCacheMode:
        """How the stage's teachers' outputs are cached (`kdpipe.job.cache_policy`)."""
        cacheable = bool(self.spec.teachers) and METHODS[self.spec.method].cacheable(self.params)
        return cache_policy.stage_mode(self.spec.teacher_cache, job.teacher_cache, cacheable)


@dataclass(frozen=True)
class Plan:
    job: JobSpec
    order: list[str]  # teachers before students
    stages: dict[str, PlannedStage]
    settings: tuple[str, ...] = ()  # the `--set PATH=VALUE`s applied to the job file, as given

    def fingerprints(self, data_id: str, digests: Mapping[str, str] | None = None) -> dict[str, str]:
        """Each stage's fingerprint; `digests` holds each imported source's content digest, by its `init.weights`.
        A stage whose source has no digest (not fetched yet) has none, nor have the stages that learn from it."""
        prints: dict[str, str] = {}
        digests = digests or {}
        for name in self.order:
            stage = self.stages[name]
            init = stage.spec.init
            if (init and init.weights not in digests) or not all(t in prints for t in stage.spec.teachers):
                continue
            upstream = [prints[t] for t in stage.spec.teachers]
            identity = stage.identity(self.job, digests[init.weights] if init else "")
            prints[name] = dag.fingerprint(identity, upstream, data_id)
        return prints

    def current_fingerprints(self, digests: Mapping[str, str]) -> dict[str, str]:
        """The fingerprints as the data stands, for looking up what a run would reuse; none while synthetic data
        has not been generated (so nothing can have trained on it)."""
        identity = data_identity(self.job.data)
        return self.fingerprints(identity, digests) if identity else {}

    def imports(self) -> dict[str, str]:
        """Each imported weights source (`init.weights`), with the first field path that names it."""
        found: dict[str, str] = {}
        for i, stage in enumerate(self.job.stages):
            if stage.init is not None:
                found.setdefault(stage.init.weights, f"stages[{i}].init.weights")
        return found

    def named(self, name: str) -> list[str]:
        """The planned stages a name stands for: a stage, or every repeat of a job-file stage."""
        return [n for n, stage in self.stages.items() if name in (n, stage.source.name if stage.source else n)]

    def downstream(self, name: str) -> set[str]:
        """`name` and every stage that learns from it, directly or through others."""
        found = {name}
        for stage in self.order:
            if found.intersection(self.stages[stage].spec.teachers):
                found.add(stage)
        return found


def plan_job(job: JobSpec, check_models: bool = False) -> Plan:
    """The job planned; `check_models` also builds each stage's model and traces each feature method's taps on
    blank models (seconds: for `validate` and `run`, not for looking at a job's runs)."""
    order = dag.topological_order(job.stages)
    planned, index = {}, {}
    for i, stage in enumerate(job.stages):
        planned[stage.name], index[stage.name] = plan_stage(stage, f"stages[{i}]"), i
        if stage.search is not None:
            check_search(planned[stage.name], f"stages[{i}].search.space")
    check_baseline(job, job.baseline, "baseline")
    if check_models:
        check_stage_models(job, planned, index)
    return repeat_over_seeds(job, order, planned, index)


def check_stage_models(job: JobSpec, planned: dict[str, PlannedStage], index: dict[str, int]) -> None:
    """Every stage's `model_args` are taken by its model's constructor, and every feature method can read its
    models' features."""
    blank = BlankModels(job.data.classes)
    for name, stage in planned.items():
        where = f"stages[{index[name]}]"
        if stage.spec.model_args:
            blank.build(stage.spec, f"{where}.model_args")
        check_taps(job, stage, [planned[t].spec for t in stage.spec.teachers], blank, where)


class BlankModels:
    """Each stage's model, freshly built once per job (its family and `model_args`), for checking a job."""

    def __init__(self, classes: int):
        self.classes, self.built = classes, {}

    def __call__(self, spec: StageSpec) -> nn.Module:
        key = (spec.model, json.dumps(spec.model_args, sort_keys=True))
        if key not in self.built:
            with shapes_only():
                self.built[key] = build_model(spec.model, self.classes, spec.model_args)
        return self.built[key]

    def build(self, spec: StageSpec, where: str) -> None:
        """A stage's model with its `model_args`, or one line saying what its constructor refused."""
        try:
            self(spec)
        except Exception as err:  # noqa: BLE001 - a family's constructor raises what it likes for bad options
            raise UserError(f"{where}: {spec.model} refuses them: {reason_of(err)}") from None


def reason_of(err: Exception) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def check_taps(job: JobSpec, stage: PlannedStage, teachers: list[StageSpec], blank: BlankModels, where: str) -> None:
    """A method that reads features can read them from these models: it is built on `blank` models of the stage's
    and its teachers' families, which traces its taps on a blank image."""
    spec, method = stage.spec, METHODS[stage.spec.method]
    if method.logits_only:
        return
    setting = {"model": spec.model, "num_classes": job.data.classes, "image_size": job.data.image_size}
    try:
        method(blank(spec), [blank(teacher) for teacher in teachers], stage.params, **setting)
    except Exception as err:  # noqa: BLE001 - whatever a family's graph raises, the pair is refused in one line
        names = ", ".join(teacher.model for teacher in teachers)
        pair = f"{spec.model} with teacher(s) {names}" if teachers else spec.model
        raise UserError(
            f"{where}: method '{spec.method}' cannot read the features of {pair}: {reason_of(err)}"
        ) from None


def check_baseline(job: JobSpec, baseline: str | None, where: str) -> None:
    """A baseline (the job file's, or `kdpipe report --baseline`) names one of the job file's stages."""
    names = [stage.name for stage in job.stages]
    if baseline is not None and baseline not in names:
        raise UserError(f"{where}: unknown stage '{baseline}'; expected one of: {', '.join(names)}")


def repeat_over_seeds(job: JobSpec, order: list[str], planned: dict[str, PlannedStage], index: dict) -> Plan:
    """One planned stage per (stage, seed). A stage of several seeds becomes `name-s<seed>` repeats, each
    learning from its teachers' repeat of the same seed, or from a teacher's only seed; a stage of one seed
    keeps its name."""
    seeds = {name: stage.spec.seeds or job.seeds or [job.seed] for name, stage in planned.items()}

    def repeat(name: str, seed: int) -> str:
        return name if len(seeds[name]) == 1 else f"{name}-s{seed}"

    stages: dict[str, PlannedStage] = {}
    for name in order:
        stage = planned[name]
        for seed in seeds[name]:
            teachers = []
            for teacher in stage.spec.teachers:
                if len(seeds[teacher]) > 1 and seed not in seeds[teacher]:
                    raise UserError(
                        f"stages[{index[name]}].teachers: '{name}' repeats seed {seed}, which its teacher '{teacher}' "
                        f"does not (its seeds: {seeds[teacher]}); give '{teacher}' that seed or a single seed"
                    )
                teachers.append(repeat(teacher, seed if len(seeds[teacher]) > 1 else seeds[teacher][0]))
            spec = stage.spec.model_copy(update={"name": repeat(name, seed), "teachers": teachers})
            if spec.name in stages or (spec.name != name and spec.name in planned):
                raise UserError(f"stages[{index[name]}]: its repeat '{spec.name}' has the name of another stage")
            stages[spec.name] = dataclasses.replace(stage, spec=spec, seed=seed, source=stage.spec)
    return Plan(job, list(stages), stages)


def plan_stage(stage: StageSpec, where: str) -> PlannedStage:
    """A stage checked against the model and method registries, with its method's params resolved."""
    if not is_known_model(stage.model):
        raise UserError(
            f"{where}.model: unknown model '{stage.model}'; expected a torchvision model name, timm:<a timm model>, "
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
    if stage.init is not None and stage.init.kind == "torchvision":
        torchvision_weights(stage.init.ref, f"{where}.init.weights")
    if stage.init is not None and stage.init.kind == "timm":
        timm_config(stage.init.ref, f"{where}.init.weights")
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
        try:
            set_at(raw, path, value)
        except PathError as err:
            raise UserError(f"{path}: {err}") from None
    try:
        return plan_stage(StageSpec.model_validate(raw), "stage")
    except ValidationError as err:
        raise UserError(describe_error(err, StageSpec)) from None


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
            found = get_at(trial.config, path)
            if found is None:
                raise UserError(f"{where}.{path}: unknown field of the stage")
            if dimension.distribution != "choice" and (isinstance(found, bool) or not isinstance(found, int | float)):
                raise UserError(
                    f"{where}.{path}: not a number of the stage ({short_repr(found)}); expected a path to a number "
                    "such as params.temperature or optimizer.lr"
                )


def check_import_files(plan: Plan) -> None:
    """Every imported weights file (`init: file:`) is there."""
    for weights, where in plan.imports().items():
        kind, _, ref = weights.partition(":")
        if kind == "file" and not Path(ref).is_file():
            raise UserError(f"{where}: no such file '{ref}'; expected a {', '.join(STATE_SUFFIXES)} weights file")


def load_plan(
    path: str | Path, check_paths: bool = True, settings: Sequence[str] = (), check_models: bool = False
) -> Plan:
    """Load, validate and plan a job file with its `--set` settings; every problem is a one-line `UserError`
    naming the file (or the setting). `check_paths=False` leaves data paths to the machine that will read them;
    `check_models` (`plan_job`) is for the commands that are about to train."""
    job = load_job(path, check_paths, settings)
    try:
        plan = dataclasses.replace(plan_job(job, check_models), settings=tuple(settings))
        if check_paths:
            check_import_files(plan)
        return plan
    except UserError as err:
        source = f"{path} with --set {' --set '.join(settings)}" if settings else path
        raise UserError(f"{source}: {err}") from None
