"""What every method is: a student, frozen teachers, and one `forward_train` returning logits and named losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method(nn.Module):
    """Subclasses set `name`, `paper`, `Params` (a pydantic model of their job-file params) and the teacher count.

    Teachers are held in a plain tuple, not as submodules: they are frozen, never optimised, never saved with the
    stage, and DeepSpeed never sees them. Extra trainable parts (connectors, heads) are ordinary submodules.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    min_teachers: ClassVar[int] = 0
    max_teachers: ClassVar[int | None] = None

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], params: BaseModel):
        super().__init__()
        self.student = student
        self.teachers = tuple(teachers)
        self.params = params
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if self.training:
            return self.forward_train(images, labels)
        return self.student(images)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits of the student and a dict of named, already weighted losses (their sum is minimised)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for teacher in self.teachers:  # teachers stay in eval mode: BN statistics and dropout frozen
            teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [teacher(images) for teacher in self.teachers]
