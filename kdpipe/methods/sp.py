"""SP: similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
arXiv 1907.09682).

The paper's similarity-preserving loss: flatten a feature map per sample, `G = f f^T` (B x B), row-normalise
`G^ = G / ||G||_row`, and
`L_SP = ||G^_t - G^_s||_F^2 / B^2` (the official RepDistiller `SP.py`; methods reference section 5). Only B x B
matrices are compared, so student and teacher widths and sizes may differ. `L = ce_weight * CE + beta * L_SP`.

Defaults: beta = 3000 and ce_weight = 1 (RepDistiller's CIFAR-100 script); the tap is each model's last stage output
(RepDistiller's f3), or the nodes the job file names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdpipe.methods.base import Method, Params, Weight
from kdpipe.models.features import stage_nodes


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||n(f_t f_t^T) - n(f_s f_s^T)||_F^2 / B^2 for features of any shape B x ...."""
    batch = student.shape[0]
    g_s = F.normalize(student.flatten(1) @ student.flatten(1).T, dim=1)
    g_t = F.normalize(teacher.flatten(1) @ teacher.flatten(1).T, dim=1)
    return (g_t - g_s).pow(2).sum() / batch**2


class SPParams(Params):
    beta: Weight = 3000.0
    ce_weight: Weight = 1.0
    student_node: str | None = Field(None, description="student feature node (default: its last stage output)")
    teacher_node: str | None = Field(None, description="teacher feature node (default: its last stage output)")


class SP(Method):
    name = "sp"
    paper = "Tung & Mori, ICCV 2019, arXiv 1907.09682"
    Params = SPParams
    min_teachers = max_teachers = 1

    def __init__(self, student, teachers, params: SPParams, **setting):
        super().__init__(student, teachers, params, **setting)
        self.nodes = (
            params.student_node or stage_nodes(student, self.image_size)[-1],
            params.teacher_node or stage_nodes(self.teachers[0], self.image_size)[-1],
        )
        self.tap("student", student, [self.nodes[0]])
        self.tap("teacher", self.teachers[0], [self.nodes[1]])

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits, student = self.features("student", images)
        _, teacher = self.features("teacher", images)
        transfer = sp_loss(student[self.nodes[0]], teacher[self.nodes[1]])
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, labels), "sp": p.beta * transfer}
