"""TAKD: teacher assistants (Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI 2020,
arXiv 1902.03393).

A chain T -> TA -> ... -> S written as stages in the job's DAG, each stage `takd` from the stage just above it
(section 3 of the paper; methods reference section 9). Each link is
`L = (1 - lambda) * CE(zs, y) + lambda * T^2 * KL_em(softmax(zt/T) || softmax(zs/T))`, where KL_em is the mean
over every element (`nn.KLDivLoss()` with its default reduction, as the official `train.py`): 1/C of KD's
batch-mean KL at the same weight.

Defaults (the paper tunes lambda and T per link with NNI's TPE over lambda in 0.05..1 and T in {1, 2, 5, 10, 15,
20}, so there is no single published value; 'confirm' in the reference): T = 5, the DGKD code's default for the
same chains, and lambda = 0.5, the middle of the searched range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdpipe.methods.base import Method, Params, Temperature
from kdpipe.methods.kd import kd_loss


def takd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL averaged over every element (batch and classes), TAKD's and DGKD's reduction."""
    return kd_loss(student_logits, teacher_logits, temperature) / student_logits.shape[1]


class TAKDParams(Params):
    temperature: Temperature = 5.0
    kd_weight: float = Field(0.5, ge=0, le=1, description="the paper's lambda: KD's weight; CE gets 1 - lambda")


class TAKD(Method):
    name = "takd"
    paper = "Mirzadeh et al., AAAI 2020, arXiv 1902.03393"
    Params = TAKDParams
    min_teachers = max_teachers = 1
    logits_only = True

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits = self.student(images)
        (teacher,) = self.teacher_logits(images)
        return logits, {
            "ce": (1 - p.kd_weight) * F.cross_entropy(logits, labels),
            "kd": p.kd_weight * takd_kl(logits, teacher, p.temperature),
        }
