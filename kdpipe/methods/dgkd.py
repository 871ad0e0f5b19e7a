"""DGKD: densely guided knowledge distillation (Son, Na, Choi & Hwang, "Densely Guided Knowledge Distillation using
Multiple Teacher Assistants", ICCV 2021, arXiv 2009.08825).

In a chain T > A1 > ... > An > S every model learns from all larger ones already trained: the job's stages list them
all as `teachers` (A_k from T, A1..A_k-1; S from T, A1..An). The loss is the official code's (`train.py`; methods
reference section 10): `L = (1 - lambda) * CE + lambda * T^2 * sum over kept teachers of KL_em`, KL_em being the
element-mean KL (TAKD's reduction, `kdpipe.methods.takd.takd_kl`).

Stochastic teaching (the paper's stochastic DGKD): on every mini-batch each teacher's term is dropped with probability
`drop_prob`, and never all of them. Independent Bernoulli drops cannot give both (redrawing an all-dropped batch
lowers every drop rate), so the number dropped is drawn as floor(n p) or ceil(n p) with mean exactly n p and that
many teachers are picked uniformly: each is dropped with probability exactly p, and at most n - 1 are dropped
(which needs p <= (n - 1) / n). With one teacher nothing is dropped. This generalises the official code, which
drops a fixed `drop_num` uniformly (p = drop_num / n); the paper's survival probability 0.75 gives the default
drop_prob = 0.25. Which terms the paper lets drop is 'confirm' in the reference; here the teacher's can too, as in
the official code. The paper trains the assistants without dropping: give them drop_prob 0 in the job.

Defaults T = 5 and lambda = 1 (no CE term) are the official code's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from kdpipe.methods.base import Method, Params, Temperature
from kdpipe.methods.takd import takd_kl


def dropped_teachers(count: int, drop_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask over `count` teachers, True for dropped: each with probability `drop_prob`, never all."""
    mask = torch.zeros(count, dtype=torch.bool)
    if count < 2 or drop_prob == 0:
        return mask
    mean = count * drop_prob  # at most count - 1: checked with the job file
    dropped = math.floor(mean) + int(torch.rand((), generator=generator) < mean - math.floor(mean))
    mask[torch.randperm(count, generator=generator)[:dropped]] = True
    return mask


class DGKDParams(Params):
    temperature: Temperature = 5.0
    kd_weight: float = Field(1.0, ge=0, le=1, description="lambda: the KD terms' weight; CE gets 1 - lambda")
    drop_prob: float = Field(0.25, ge=0, lt=1, description="chance each teacher's term is dropped per mini-batch")


class DGKD(Method):
    name = "dgkd"
    paper = "Son et al., ICCV 2021, arXiv 2009.08825"
    Params = DGKDParams
    min_teachers = 1
    logits_only = True

    @classmethod
    def check(cls, params: DGKDParams, teachers: int) -> str | None:
        if teachers > 1 and params.drop_prob > (teachers - 1) / teachers:
            return (
                f"drop_prob: with {teachers} teachers at most {(teachers - 1) / teachers:.3g}, so that never all "
                f"are dropped; got {params.drop_prob}"
            )
        return None

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits = self.student(images)
        dropped = dropped_teachers(len(self.teachers), p.drop_prob)
        with torch.no_grad():
            kept = [teacher(images) for teacher, out in zip(self.teachers, dropped, strict=True) if not out]
        soft = sum(takd_kl(logits, zt, p.temperature) for zt in kept)
        return logits, {"ce": (1 - p.kd_weight) * F.cross_entropy(logits, labels), "kd": p.kd_weight * soft}
