"""What every method is: a student, frozen teachers, and one `forward_train` returning logits and named losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdpipe.models.features import Taps, feature_shapes


class Params(BaseModel):
    """A method's job-file parameters; unknown keys are errors, floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# The value types of method parameters: bounded, so that no job file asks for a loss that overflows.
Weight = Annotated[float, Field(ge=0, le=1e6)]
PositiveWeight = Annotated[float, Field(gt=0, le=1e6)]
Temperature = Annotated[float, Field(gt=0, le=100)]
Epochs = Annotated[int, Field(ge=0, le=100_000)]


class Method(nn.Module):
    """Subclasses set `name`, `paper`, `Params` (a pydantic model of their job-file params) and the teacher count.

    Teachers are held in a plain tuple, not as submodules: they are frozen, never optimised, never saved with the
    stage, and DeepSpeed never sees them. Extra trainable parts (connectors, heads, peers) are ordinary submodules.
    `model`, `num_classes` and `image_size` describe the student, for methods that build peers or probe shapes.
    """

    name: ClassVar[str]
    # Raised by a method's module whenever what it trains changes (a loss fixed, a default changed): it is part of
    # every fingerprint of a stage using the method, so those stages and their students train again.
    version: ClassVar[int] = 1
    paper: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = Params
    min_teachers: ClassVar[int] = 0
    max_teachers: ClassVar[int | None] = None
    # Whether the method uses its teachers only by calling them on the training images for their logits: the
    # teacher-output cache can then answer for them (a method that taps a teacher's features cannot use it).
    logits_only: ClassVar[bool] = False

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        params: BaseModel,
        *,
        model: str = "",
        num_classes: int = 0,
        image_size: int = 32,
    ):
        super().__init__()
        self.student = student
        self.teachers = tuple(teachers)
        self.params = params
        self.model, self.num_classes, self.image_size = model, num_classes, image_size
        self.epoch = 0
        self._taps: dict[str, Taps] = {}  # a plain dict: traced views share their model's weights, saved once
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)

    @classmethod
    def check(cls, params: BaseModel, teachers: int) -> str | None:
        """A problem with these params for this many teachers, as 'field: what was expected', or None."""
        return None

    @classmethod
    def cacheable(cls, params: BaseModel) -> bool:
        """Whether, with these params, the teacher-output cache can answer for the method's teachers."""
        return cls.logits_only

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if self.training:
            return self.forward_train(images, labels)
        return self.student(images)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits of the student and a dict of named, already weighted losses (their sum is minimised)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch (0-based), resumed epochs included."""
        self.epoch = epoch

    def epoch_metrics(self) -> dict[str, float]:
        """Per-epoch values the method wants logged and plotted (a schedule, learned weights)."""
        return {}

    def peers(self) -> dict[str, tuple[str, nn.Module]]:
        """Networks trained beside the student and saved with it, as {name: (model name, module)}."""
        return {}

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for teacher in self.teachers:  # teachers stay in eval mode: BN statistics and dropout frozen
            teacher.eval()
        for key, taps in self._taps.items():
            taps.train(mode and not key.startswith("teacher"))
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [teacher(images) for teacher in self.teachers]

    def tap(self, key: str, model: nn.Module, nodes: list[str]) -> dict[str, torch.Size]:
        """Register a traced view of `model` returning `nodes` (key 'student', 'peer...' or 'teacher...'); returns
        each node's feature shape, for sizing connectors."""
        self._taps[key] = Taps(model, nodes)
        shapes = feature_shapes(self._taps[key], self.image_size)
        self._taps[key].train(self.training and not key.startswith("teacher"))
        return shapes

    def features(self, key: str, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and tapped features of a registered model; a teacher's without gradients."""
        if key.startswith("teacher"):
            with torch.no_grad():
                return self._taps[key](images)
        return self._taps[key](images)
