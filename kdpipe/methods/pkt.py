"""PKT: probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with Probabilistic
Knowledge Transfer", ECCV 2018, arXiv 1803.10837).

The paper's divergence between the two networks' conditional probability distributions, with the cosine
kernel of the official `cosine_similarity_loss`: `x^ = x / (||x|| + eps)`,
`K = (x^ x^T + 1) / 2`, conditional probabilities `P_ij = K_ij / sum_j K_ij` (diagonal kept), and
`L_PKT = mean over all B^2 entries of P^t log((P^t + eps) / (P^s + eps))` with eps = 1e-7 (methods reference
section 6). The kernels live in each network's own feature space, so the widths may differ.

Defaults: beta = 30000 and ce_weight = 1 (RepDistiller's CIFAR-100 script), on the pooled penultimate vectors
(RepDistiller's f4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method, Params, Weight
from kdpipe.models.features import pooled_node

EPS = 1e-7


def cosine_probabilities(features: torch.Tensor) -> torch.Tensor:
    x = features.flatten(1)
    x = torch.nan_to_num(x / (x.norm(dim=1, keepdim=True) + EPS))
    kernel = (x @ x.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    p_s, p_t = cosine_probabilities(student), cosine_probabilities(teacher)
    return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()


class PKTParams(Params):
    beta: Weight = 30000.0
    ce_weight: Weight = 1.0


class PKT(Method):
    name = "pkt"
    paper = "Passalis & Tefas, ECCV 2018, arXiv 1803.10837"
    Params = PKTParams
    min_teachers = max_teachers = 1

    def __init__(self, student, teachers, params: PKTParams, **setting):
        super().__init__(student, teachers, params, **setting)
        self.pooled = pooled_node(student), pooled_node(self.teachers[0])
        self.tap("student", student, [self.pooled[0]])
        self.tap("teacher", self.teachers[0], [self.pooled[1]])

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits, student = self.features("student", images)
        _, teacher = self.features("teacher", images)
        transfer = pkt_loss(student[self.pooled[0]], teacher[self.pooled[1]])
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, labels), "pkt": p.beta * transfer}
