"""KD: soft targets (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531).

Implements `L = ce_weight * CE(zs, y) + kd_weight * T^2 * KL(softmax(zt/T) || softmax(zs/T))` with KL summed over
classes and averaged over the batch (`batchmean`, as RepDistiller and mdistiller). The T^2 factor keeps gradient
magnitudes comparable across temperatures (the paper's section on distillation).

Defaults T=4, ce_weight=0.1, kd_weight=0.9 are RepDistiller's CIFAR-100 KD settings (methods reference, section 2).
With several teachers (a choice the paper leaves open) the KD term is the mean over teachers, so the loss scale
does not grow with the number of teachers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method, Params, Temperature, Weight


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL_batchmean(softmax(zt/T) || softmax(zs/T)): KL summed over classes, averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KDParams(Params):
    temperature: Temperature = 4.0
    ce_weight: Weight = 0.1
    kd_weight: Weight = 0.9


class KD(Method):
    name = "kd"
    paper = "Hinton, Vinyals & Dean 2015, arXiv 1503.02531"
    Params = KDParams
    min_teachers = 1
    logits_only = True

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        soft = sum(kd_loss(logits, zt, p.temperature) for zt in teacher_logits) / len(teacher_logits)
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, labels), "kd": p.kd_weight * soft}
