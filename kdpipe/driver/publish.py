"""A finished stage's weights as a model a service loads: the config `kdpipe.tracking.classifier_code` rebuilds
the network and its preprocessing from, and what loading it requires."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

from kdpipe.data import NORMALIZATION, PreparedData, class_names, held_out_geometry
from kdpipe.models import META_FILE, WEIGHTS_FILE, cifar_resnet, constructor, expected_input, load_weights
from kdpipe.models.profile import profile

# CPU threads a stage's latency and throughput are measured with: a serving replica's share of a machine.
THREADS = min(4, os.cpu_count() or 1)
# The code a served model imports beside its libraries: kdpipe's CIFAR ResNets travel as one plain module.
OWN_MODULES = {cifar_resnet.__name__: Path(cifar_resnet.__file__)}


def classifier_config(folder: Path, data: PreparedData) -> tuple[dict, list[str], list[str]]:
    """For weights saved by `kdpipe.models.save_weights` in `folder`: the served model's config, the code files it
    imports, and its pip requirements (pinned to this machine's versions, which trained it)."""
    meta = json.loads((folder / META_FILE).read_text())
    build = constructor(meta["model"], meta["num_classes"], meta.get("model_args"))
    wanted = expected_input(folder)
    mean, std = NORMALIZATION[data.normalization]
    if wanted:  # weights imported as they are keep their own input
        mean, std = wanted.mean or mean, wanted.std or std
    size = (wanted and wanted.image_size) or data.image_size
    resize, crop = held_out_geometry(size)
    module, code = build.module, []
    if module in OWN_MODULES:
        module, code = module.rsplit(".", 1)[1], [str(OWN_MODULES[module])]
    config = {
        "constructor": {"module": module, "function": build.function, "kwargs": build.kwargs},
        "classes": list(class_names(data)),
        "resize": resize,
        "crop": crop,
        "mean": list(mean),
        "std": list(std),
    }
    packages = ["torch", "torchvision", "safetensors", "numpy", "pandas"] + (["timm"] if module == "timm" else [])
    return config, code, [f"{name}=={version(name)}" for name in packages]


def model_costs(folder: Path, image_size: int) -> dict[str, float]:
    """The saved network's size and speed (`kdpipe.models.profile`) at its served image size, as run metrics."""
    costs = profile(load_weights(folder), image_size, THREADS).metrics()
    return costs | {"model/weights_bytes": float((folder / WEIGHTS_FILE).stat().st_size)}
