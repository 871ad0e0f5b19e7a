"""Model registry: the project's small CIFAR-style ResNets, every torchvision classification model, and every timm
model (`timm:<name>`), each with the constructor options a job gives (`model_args`).

Models are always built without weights; where a stage's start from elsewhere (a file, a hub, MLflow), they are
fitted to the built model (`kdpipe.models.sources`). torchvision and timm are imported only for their own models:
importing them costs seconds, which a job of CIFAR ResNets never pays.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdpipe.models.cifar_resnet import CifarResNet
from kdpipe.models.inputs import ModelInput

# resnet8 ... resnet110 (He et al. 2016, 6n+2 layers, widths 16/32/64); the `x4` variants use widths 64/128/256
# with a 32-channel stem, as RepDistiller's resnet8x4 / resnet32x4.
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"
_CIFAR = re.compile(r"^resnet(8|14|20|32|44|56|110)(x4)?$")
TIMM = "timm:"


def is_known_model(name: str) -> bool:
    if _CIFAR.match(name):
        return True
    if name.startswith(TIMM):
        import timm

        return timm.is_model(name[len(TIMM) :])
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def constructor(name: str, num_classes: int, args: Mapping[str, Any] | None = None) -> Constructor:
    """How to build `name`: the function (by module and name) and its keyword arguments, all plain values, so a
    served model (`kdpipe.tracking.classifier_code`) rebuilds the network without kdpipe."""
    args = dict(args or {})
    match = _CIFAR.match(name)
    if match:
        if args:
            raise TypeError(f"{name} takes no model_args (got {', '.join(args)})")
        wide = bool(match[2])
        widths, stem = ([64, 128, 256], 32) if wide else ([16, 32, 64], 16)
        kwargs = {"depth": int(match[1]), "widths": widths, "stem": stem, "num_classes": num_classes}
        return Constructor(CifarResNet.__module__, CifarResNet.__name__, kwargs)
    if name.startswith(TIMM):
        kwargs = {"model_name": name[len(TIMM) :], "pretrained": False, "num_classes": num_classes, **args}
        return Constructor("timm", "create_model", kwargs)
    kwargs = {"name": name, "weights": None, "num_classes": num_classes, **args}
    return Constructor("torchvision.models", "get_model", kwargs)


@dataclass(frozen=True)
class Constructor:
    module: str
    function: str
    kwargs: dict[str, Any]

    def build(self) -> nn.Module:
        return getattr(importlib.import_module(self.module), self.function)(**self.kwargs)


def build_model(name: str, num_classes: int, args: Mapping[str, Any] | None = None) -> nn.Module:
    """A freshly initialised classifier with `num_classes` outputs, taking B x 3 x H x W images; `args` are the
    constructor's other options (a ViT's `image_size` or `img_size`, ...)."""
    return constructor(name, num_classes, args).build()


# torch's initialisers, by name: what a model built for its shapes alone skips.
INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Models built to check a job (their shapes, their features' shapes) rather than to train: torch's
    initialisers write zeros instead of drawing random numbers, most of the second a ViT-B takes to build."""

    def zeros(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return tensor.zero_()

    saved = {name: getattr(torch.nn.init, name) for name in INITIALISERS}
    for name in saved:
        setattr(torch.nn.init, name, zeros)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def head_keys(model: nn.Module, name: str, num_classes: int, args: Mapping[str, Any] | None = None) -> set[str]:
    """The state-dict keys of `model` (`name` built for `num_classes`) whose shapes follow the number of classes
    (the classifier head), found by building it for one class more. (On the CPU: the meta device would spare the
    initialisation, but its first use imports seconds of torch, and RegNet's constructor cannot run there.)"""
    other = build_model(name, num_classes + 1, args).state_dict()
    return {key for key, value in model.state_dict().items() if value.shape != other[key].shape}


def save_weights(
    model: nn.Module,
    name: str,
    num_classes: int,
    folder: Path,
    args: Mapping[str, Any] | None = None,
    wanted: ModelInput | None = None,
) -> None:
    """Weights only (safetensors) plus the facts needed to rebuild the module (and, for weights imported as they
    are, the input they expect): never a pickled module."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    meta: dict[str, Any] = {"model": name, "num_classes": num_classes}
    if args:
        meta["model_args"] = dict(args)
    if wanted:
        meta["input"] = wanted.to_json()
    (folder / META_FILE).write_text(json.dumps(meta))


def load_weights(folder: Path) -> nn.Module:
    """Rebuild a model saved by `save_weights`; safetensors holds tensors only, so loading runs no code."""
    meta = json.loads((folder / META_FILE).read_text())
    model = build_model(meta["model"], meta["num_classes"], meta.get("model_args"))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model


def expected_input(folder: Path) -> ModelInput | None:
    """The input weights saved by `save_weights` expect, where they were imported with one of their own."""
    meta = json.loads((folder / META_FILE).read_text())
    return ModelInput.from_json(meta["input"]) if "input" in meta else None
