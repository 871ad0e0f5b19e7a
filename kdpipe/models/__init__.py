"""Model registry: the project's small CIFAR-style ResNets and every torchvision classification model.

Models are always built without weights; where a stage's start from elsewhere (a file, a hub, MLflow), they are
fitted to the built model (`kdpipe.models.sources`). torchvision is imported only for its own models:
importing it costs seconds (it loads torch's compiler stack), which a job of CIFAR ResNets never pays.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from kdpipe.models.cifar_resnet import CifarResNet

# resnet8 ... resnet110 (He et al. 2016, 6n+2 layers, widths 16/32/64); the `x4` variants use widths 64/128/256
# with a 32-channel stem, as RepDistiller's resnet8x4 / resnet32x4.
WEIGHTS_FILE = "model.safetensors"
_CIFAR = re.compile(r"^resnet(8|14|20|32|44|56|110)(x4)?$")


def is_known_model(name: str) -> bool:
    if _CIFAR.match(name):
        return True
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised classifier with `num_classes` outputs, taking B x 3 x H x W images."""
    match = _CIFAR.match(name)
    if match:
        depth, wide = int(match[1]), bool(match[2])
        return CifarResNet(
            depth, widths=(64, 128, 256) if wide else (16, 32, 64), stem=32 if wide else 16, num_classes=num_classes
        )
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def head_keys(name: str, num_classes: int) -> set[str]:
    """The state-dict keys whose shapes follow the number of classes (the classifier head), found by building the
    model for one class more. (On the CPU: the meta device would spare the initialisation, but its first use
    imports seconds of torch, and RegNet's constructor cannot run there.)"""
    ours, other = build_model(name, num_classes).state_dict(), build_model(name, num_classes + 1).state_dict()
    return {key for key, value in ours.items() if value.shape != other[key].shape}


def save_weights(model: nn.Module, name: str, num_classes: int, folder: Path) -> None:
    """Weights only (safetensors) plus the two facts needed to rebuild the module: never a pickled module."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / "model.json").write_text(json.dumps({"model": name, "num_classes": num_classes}))


def load_weights(folder: Path) -> nn.Module:
    """Rebuild a model saved by `save_weights`; safetensors holds tensors only, so loading runs no code."""
    meta = json.loads((folder / "model.json").read_text())
    model = build_model(meta["model"], meta["num_classes"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model
