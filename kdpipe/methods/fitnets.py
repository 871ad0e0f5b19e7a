"""FitNets: hints for thin deep nets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
arXiv 1412.6550).

A regressor `r` maps the student's guided layer to the teacher's hint layer and `L_hint = mean (r(F_s) - F_t)^2`
(section 2.2, eq. 3; `nn.MSELoss` in RepDistiller). `r` is RepDistiller's `ConvReg` (methods reference section
3): a stride-2 3x3 conv if the student map is twice the teacher's size, a stride-2 4x4 transposed conv if half,
else a (1 + Hs - Ht) x (1 + Ws - Wt) conv, each followed by BN and ReLU. Where none fits (a student map under half
the teacher's) the teacher map is average-pooled to the student's size and `r` is a 1x1 conv.

Both procedures of the reference are one parameter:
- `hint_epochs: 0` (default): RepDistiller's one-stage FitNet, `L = ce_weight * CE + beta * L_hint (+ kd_weight *
  KD)` from the first epoch, with beta = 100, ce_weight = 1, kd_weight = 0 (RepDistiller's scripts).
- `hint_epochs: N`: the paper's two stages in one stage. The first N epochs minimise the hint loss alone (which
  trains the student up to the guided layer and `r`, the paper's hint-based training), the rest train the whole
  student with KD, `ce_weight * CE + kd_weight * KD`. The paper gives neither stage's length nor stage 2's
  weights ('confirm'): set kd_weight > 0 for stage 2 (e.g. KD's 0.9 with ce_weight 0.1).
Taps: the middle stage output of each model (RepDistiller's f2), or the nodes the job file names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdpipe.methods.base import Epochs, Method, Params, Temperature, Weight
from kdpipe.methods.kd import kd_loss
from kdpipe.models.features import stage_nodes


class ConvReg(nn.Module):
    """The student's map (C_s x H_s x W_s) to the teacher's width and size (C_t x H_t x W_t)."""

    def __init__(self, student: torch.Size, teacher: torch.Size):
        super().__init__()
        (c_s, h_s, w_s), (c_t, h_t, w_t) = student, teacher
        self.pool_teacher = None
        if h_s == 2 * h_t:
            conv = nn.Conv2d(c_s, c_t, 3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            conv = nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1)
        elif h_s >= h_t:
            conv = nn.Conv2d(c_s, c_t, (1 + h_s - h_t, 1 + w_s - w_t))
        else:
            conv, self.pool_teacher = nn.Conv2d(c_s, c_t, 1), (h_s, w_s)
        self.body = nn.Sequential(conv, nn.BatchNorm2d(c_t), nn.ReLU())

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool_teacher:
            teacher = F.adaptive_avg_pool2d(teacher, self.pool_teacher)
        return self.body(student), teacher


class FitNetsParams(Params):
    beta: Weight = Field(100.0, description="weight of the hint loss")
    ce_weight: Weight = 1.0
    kd_weight: Weight = 0.0
    temperature: Temperature = 4.0
    hint_epochs: Epochs = Field(0, description="epochs of hint loss alone first (the paper's stage 1)")
    student_node: str | None = Field(None, description="the guided layer (default: the middle stage output)")
    teacher_node: str | None = Field(None, description="the hint layer (default: the middle stage output)")


def middle(nodes: list[str]) -> str:
    return nodes[(len(nodes) - 1) // 2]


class FitNets(Method):
    name = "fitnets"
    paper = "Romero et al., ICLR 2015, arXiv 1412.6550"
    Params = FitNetsParams
    min_teachers = max_teachers = 1

    def __init__(self, student, teachers, params: FitNetsParams, **setting):
        super().__init__(student, teachers, params, **setting)
        teacher = self.teachers[0]
        self.nodes = (
            params.student_node or middle(stage_nodes(student, self.image_size)),
            params.teacher_node or middle(stage_nodes(teacher, self.image_size)),
        )
        s_shape = self.tap("student", student, [self.nodes[0]])[self.nodes[0]]
        t_shape = self.tap("teacher", teacher, [self.nodes[1]])[self.nodes[1]]
        self.regressor = ConvReg(s_shape, t_shape)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits, student = self.features("student", images)
        teacher_logits, teacher = self.features("teacher", images)
        losses = {}
        if self.epoch >= p.hint_epochs:  # one-stage FitNet, or the paper's stage 2
            losses["ce"] = p.ce_weight * F.cross_entropy(logits, labels)
            if p.kd_weight:
                losses["kd"] = p.kd_weight * kd_loss(logits, teacher_logits, p.temperature)
        if not p.hint_epochs or self.epoch < p.hint_epochs:  # one-stage FitNet, or the paper's stage 1 (alone)
            losses["hint"] = p.beta * F.mse_loss(*self.regressor(student[self.nodes[0]], teacher[self.nodes[1]]))
        return logits, losses
