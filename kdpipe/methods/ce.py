"""Training from labels alone: cross-entropy, the baseline every distillation method is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method


class CrossEntropy(Method):
    name = "ce"
    paper = "plain supervised training (no teacher)"
    max_teachers = 0
    logits_only = True  # it reads no features

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}
