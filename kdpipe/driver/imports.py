"""Weights a job imports (`init:`): each source fetched once per job into a cache under the workdir (never by every
worker), digested for the fingerprints, and fitted to each stage's model before any stage trains.

What a stage's workers load is the fitted state dict, stored in the stage's MLflow run (`init/`): a record of where
it started, and a file every node reads the way it reads a teacher's weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from kdpipe.job.spec import InitSpec, JobSpec, StageSpec, workdir_path
from kdpipe.models import WEIGHTS_FILE, build_model, head_keys
from kdpipe.models.inputs import ModelInput
from kdpipe.models.sources import (
    file_digest,
    fit_state,
    read_state,
    timm_file,
    timm_input,
    timm_state,
    torchvision_file,
    torchvision_input,
    weights_file,
)
from kdpipe.plan import Plan
from kdpipe.tracking.downloads import download


@dataclass(frozen=True)
class InitFile:
    """A stage's starting weights, fitted to its model: what its workers load."""

    path: Path  # safetensors with the model's keys, less the fresh ones
    fresh: tuple[str, ...]  # keys that keep the model's own initialisation (a head for other classes)
    wanted: ModelInput | None = None  # an import's own input, where it has one


def cache_folder(job: JobSpec) -> Path:
    """Downloads go under the workdir when it is a local folder; beside the user's other caches when it is a URL."""
    if "://" in job.workdir:
        return Path.home() / ".cache" / "kdpipe" / "downloads"
    return Path(workdir_path(job.workdir, "downloads"))


def source_file(init: InitSpec, where: str, cache: Path, tracking_uri: str, fetch: bool = True) -> Path | None:
    """The local file a source names, downloaded first where it is remote (unless `fetch` is False: then None
    for a remote source not in the cache yet)."""
    if init.kind == "file":
        return Path(init.ref)
    if init.kind == "torchvision":
        file = torchvision_file(init.ref, cache / "torchvision", where, fetch)
        return file if file.exists() else None
    if init.kind == "timm":
        return timm_file(init.ref, cache / "timm", where, fetch)
    folder = download(init.ref, tracking_uri, cache / "mlflow", where, fetch)
    return weights_file(folder, where) if folder else None


def source_files(plan: Plan, fetch: bool = True) -> dict[str, Path]:
    """Each imported source's local file, by its `init.weights`, each fetched once. `fetch=False` (status, report)
    downloads nothing: a remote source not in the cache yet is left out."""
    files, cache = {}, cache_folder(plan.job)
    for weights, where in plan.imports().items():
        file = source_file(InitSpec(weights=weights), where, cache, plan.job.tracking.uri, fetch)
        if file is not None:
            files[weights] = file
    return files


def import_digests(files: Mapping[str, Path]) -> dict[str, str]:
    """Each source's content digest, by its `init.weights`: what the fingerprints hold of it (a source without one
    gives the stages that learn from it no fingerprint)."""
    return {weights: file_digest(file) for weights, file in files.items()}


def expected_input(init: InitSpec, spec: StageSpec, where: str) -> ModelInput | None:
    """The input imported weights expect: a hub's from its config, a file's or MLflow model's as `init:` states."""
    if init.kind == "torchvision":
        return torchvision_input(init.ref, where)
    if init.kind == "timm":
        return timm_input(init.ref, spec.model_args, where)
    if init.mean or init.image_size:
        return ModelInput(init.mean and tuple(init.mean), init.std and tuple(init.std), init.image_size)
    return None


def fit_imports(
    plan: Plan, files: Mapping[str, Path], num_classes: int, folder: Path
) -> Iterator[tuple[str, InitFile, str]]:
    """Each importing stage's weights (its source's file in `files`) fitted to its model, written under `folder`:
    (stage, file, note), where the note says the head starts fresh ("" when it does not). Stages sharing a source,
    a model and whether they import or fine-tune share a file."""
    fitted = {}
    for i, spec in enumerate(plan.job.stages):
        init = spec.init
        if init is None:
            continue
        where = f"stages[{i}].init.weights"
        key = (init.weights, spec.model, json.dumps(spec.model_args, sort_keys=True), spec.epochs == 0)
        if key not in fitted:
            source = files[init.weights]
            model = build_model(spec.model, num_classes, spec.model_args)
            head = head_keys(model, spec.model, num_classes, spec.model_args)
            weights = timm_state(init.ref, source, spec.model_args) if init.kind == "timm" else read_state(source)
            state, fresh, note = fit_state(model, head, weights, where)
            path = folder / str(len(fitted)) / WEIGHTS_FILE
            path.parent.mkdir()
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            wanted = expected_input(init, spec, where) if spec.epochs == 0 else None
            fitted[key] = InitFile(path, fresh, wanted), note
        fitted_init, note = fitted[key]
        for name in plan.named(spec.name):
            yield name, fitted_init, note
