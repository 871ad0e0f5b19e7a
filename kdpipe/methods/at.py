"""AT: attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, arXiv 1612.03928).

The paper's activation-based attention map F_sum^p with p = 2, averaged over channels as the official `utils.at`:
`a(F) = mean_d F_d^2`, flattened over H x W and L2-normalised per sample, `Q = a / ||a||`. Each pair of student and
teacher taps adds `mean_{b,k} (Q_s - Q_t)^2` (the official `at_loss`; methods reference section 4); where the
spatial sizes differ the larger map is average-pooled to the smaller. `L = ce_weight * CE + beta * sum over pairs`.

Defaults: beta = 1000 (the paper's code and RepDistiller), ce_weight = 1, p = 2. Taps: the stage outputs of each
model (RepDistiller's f1..f3 on CIFAR ResNets); with unequal counts the deepest ones are paired, a choice the
paper (same-family WRN groups) leaves open.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdpipe.methods.base import Method, Params, PositiveWeight, Weight
from kdpipe.models.features import pair_deepest, same_size, stage_nodes


def attention(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """B x D x H x W -> B x HW: the channel mean of |F|^p, L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    student, teacher = same_size(student, teacher)
    return (attention(student, p) - attention(teacher, p)).pow(2).mean()


def stage_pairs(params, student: nn.Module, teacher: nn.Module, image_size: int) -> list[tuple[str, str]]:
    """The job file's `student_nodes`/`teacher_nodes`, or each model's stage outputs, paired from the deepest."""
    return pair_deepest(
        params.student_nodes or stage_nodes(student, image_size),
        params.teacher_nodes or stage_nodes(teacher, image_size),
    )


class ATParams(Params):
    beta: Weight = 1000.0
    ce_weight: Weight = 1.0
    p: PositiveWeight = 2.0
    student_nodes: list[str] | None = Field(None, description="student feature nodes (default: its stage outputs)")
    teacher_nodes: list[str] | None = Field(None, description="teacher feature nodes, paired in order")


class AT(Method):
    name = "at"
    paper = "Zagoruyko & Komodakis, ICLR 2017, arXiv 1612.03928"
    Params = ATParams
    min_teachers = max_teachers = 1

    def __init__(self, student, teachers, params: ATParams, **setting):
        super().__init__(student, teachers, params, **setting)
        self.pairs = stage_pairs(params, student, self.teachers[0], self.image_size)
        self.tap("student", student, [s for s, _ in self.pairs])
        self.tap("teacher", self.teachers[0], [t for _, t in self.pairs])

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits, student = self.features("student", images)
        _, teacher = self.features("teacher", images)
        transfer = sum(at_loss(student[s], teacher[t], p.p) for s, t in self.pairs)
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, labels), "at": p.beta * transfer}
