"""A model's own input: the normalization and image size its weights were trained with, and the batch a student
sees brought to it. timm's distillation task re-normalizes its teacher's input the same way; a stated size is
reached by resizing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelInput:
    mean: tuple[float, ...] | None  # None, with std: the data's normalization
    std: tuple[float, ...] | None
    image_size: int | None = None  # None: any size

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelInput:
        mean, std = data.get("mean"), data.get("std")
        return cls(mean and tuple(mean), std and tuple(std), data.get("image_size"))


def input_adapter(
    data_mean: Sequence[float], data_std: Sequence[float], wanted: ModelInput, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch normalized by the data's mean and std, renormalized by the model's (x * s_d / s_m + (m_d - m_m) / s_m)
    and resized to its image size."""

    def column(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    mean, std = wanted.mean or data_mean, wanted.std or data_std
    scale = column(data_std) / column(std)
    shift = (column(data_mean) - column(mean)) / column(std)
    size = wanted.image_size

    def adapt(images: torch.Tensor) -> torch.Tensor:
        images = images * scale.to(images.dtype) + shift.to(images.dtype)
        if size and images.shape[-1] != size:
            shrinking = images.shape[-1] > size
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=shrinking)
        return images

    return adapt


def adapt_input(model: nn.Module, adapter: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Every call of `model` takes its batch through `adapter` first; feature taps read it as `input_adapter`
    (`kdpipe.models.features.Taps`), since a traced graph runs no hooks of the model it was traced from."""
    model.register_forward_pre_hook(lambda _module, args: (adapter(args[0]), *args[1:]))
    model.input_adapter = adapter
