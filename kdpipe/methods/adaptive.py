"""Adaptive distillation: learned aggregation of several distillation paths (Chennupati, Kamani, Cheng & Chen,
"Adaptive Distillation: Aggregating Knowledge from Multiple Paths for Efficient Distillation", BMVC 2021,
arXiv 2110.09674).

Several paths from teacher to student, each a loss `L_k` with a weight `w_k`, aggregated by the official code's
multitask rule (`kd_image.py`; methods reference section 14): a learnable vector `a`, one entry per path,
initialised to zeros and trained by the stage's optimiser (weight decay included), and
`L = CE + alpha_d * [sum_k exp(-a_k) w_k L_k + sum_k a_k]` (homoscedastic-uncertainty weighting; at the optimum
`exp(-a_k) = 1 / (w_k L_k)`). `adaptive: false` is the fixed-weight comparison, `L = CE + alpha_d * sum_k w_k L_k`
(the paper's equal weights with every w_k = 1). `exp(-a_k)`, the method's diagnostic, is logged per epoch and
plotted.

Paths (the official losses):
- `st`: soft targets, `T^2 KL_batchmean` at T = 4 (`kdpipe.methods.kd.kd_loss`);
- `logits`: `MSE(zs, zt)`;
- `at`: attention transfer on the raw stage outputs, summed over stage pairs (the official AT divides the channel
  sum by its norm + 1e-6, which equals `kdpipe.methods.at.at_loss` up to that eps);
- `nst`: per stage, each channel's map L2-normalised over H x W, the per-sample D x D Gram matrices of the adapted
  student and the teacher compared by MSE, summed over stages;
- `fm`: per stage, MSE of the spatially averaged channels, adapted student against teacher, summed over stages.
Adaptation layers (for `nst` and `fm`): one bias-free 1x1 conv with BN per stage, student width to teacher width.
The SRRL softmax-regression path (the teacher's own classifier on the student's features) is not offered: it needs
the teacher's head as a separate module, which torchvision's models do not share one way.

Defaults: the shipped `_adaptive_at_st` config, paths AT and ST with w = 1, adaptive, alpha_d = 1; taps are the
stage outputs of each model, deepest paired first.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdpipe.methods.at import at_loss, stage_pairs
from kdpipe.methods.base import Method, Params, Temperature, Weight
from kdpipe.methods.kd import kd_loss
from kdpipe.models.features import Connector

Path = Literal["st", "logits", "at", "nst", "fm"]
FEATURE_PATHS = ("at", "nst", "fm")


def aggregate(losses: torch.Tensor, log_vars: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted path losses `w_k L_k` as aggregated: `(exp(-a_k) w_k L_k per path, sum_k a_k)`; without `a`
    (fixed weights), `(w_k L_k, 0)`. Their total is what the rule minimises."""
    if log_vars is None:
        return losses, losses.new_zeros(())
    return torch.exp(-log_vars) * losses, log_vars.sum()


def gram_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between per-sample D x D Grams of channel maps L2-normalised over H x W (the official NST path)."""

    def gram(feature: torch.Tensor) -> torch.Tensor:
        flat = F.normalize(feature.flatten(2), dim=2)
        return flat @ flat.transpose(1, 2)

    return F.mse_loss(gram(student), gram(teacher))


class AdaptiveParams(Params):
    paths: list[Path] = Field(default_factory=lambda: ["at", "st"], min_length=1)
    weights: dict[Path, Weight] = Field(default_factory=dict, description="w_k per path (default 1)")
    adaptive: bool = Field(True, description="learn the path weights (false: fixed weights w_k)")
    distill_weight: Weight = Field(1.0, description="alpha_d, the weight of the aggregated paths")
    temperature: Temperature = 4.0
    student_nodes: list[str] | None = Field(None, description="student feature nodes (default: its stage outputs)")
    teacher_nodes: list[str] | None = Field(None, description="teacher feature nodes, paired from the deepest")


class Adaptive(Method):
    name = "adaptive"
    paper = "Chennupati et al., BMVC 2021, arXiv 2110.09674"
    Params = AdaptiveParams
    min_teachers = max_teachers = 1

    @classmethod
    def check(cls, params: AdaptiveParams, teachers: int) -> str | None:
        unused = sorted(set(params.weights) - set(params.paths))
        if unused:
            return f"weights: {', '.join(unused)} not in paths {params.paths}"
        if len(set(params.paths)) < len(params.paths):
            return f"paths: each path once, got {params.paths}"
        return None

    @classmethod
    def cacheable(cls, params: AdaptiveParams) -> bool:
        return not set(params.paths) & set(FEATURE_PATHS)  # feature paths tap the teacher, which then runs anyway

    def __init__(self, student, teachers, params: AdaptiveParams, **setting):
        super().__init__(student, teachers, params, **setting)
        self.pairs: list[tuple[str, str]] = []
        self.connectors = nn.ModuleList()
        if set(params.paths) & set(FEATURE_PATHS):
            self.pairs = stage_pairs(params, student, self.teachers[0], self.image_size)
            s_shapes = self.tap("student", student, [s for s, _ in self.pairs])
            t_shapes = self.tap("teacher", self.teachers[0], [t for _, t in self.pairs])
            if set(params.paths) & {"nst", "fm"}:  # AT compares the raw maps
                self.connectors.extend(Connector(s_shapes[s][0], t_shapes[t][0]) for s, t in self.pairs)
        self.register_buffer("path_weights", torch.tensor([params.weights.get(k, 1.0) for k in params.paths]))
        self.log_vars = nn.Parameter(torch.zeros(len(params.paths))) if params.adaptive else None

    def epoch_metrics(self) -> dict[str, float]:
        if self.log_vars is None:
            return {}
        weights = torch.exp(-self.log_vars.detach().float()).tolist()
        return {f"adaptive/weight_{path}": w for path, w in zip(self.params.paths, weights, strict=True)}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        if self.pairs:
            logits, student = self.features("student", images)
            teacher_logits, teacher = self.features("teacher", images)
        else:
            logits, (teacher_logits,) = self.student(images), self.teacher_logits(images)
        connectors = self.connectors or [None] * len(self.pairs)
        pairs = [(student[s], teacher[t], c) for (s, t), c in zip(self.pairs, connectors, strict=True)]
        path_loss = {
            "st": lambda: kd_loss(logits, teacher_logits, p.temperature),
            "logits": lambda: F.mse_loss(logits, teacher_logits),
            "at": lambda: sum(at_loss(fs, ft) for fs, ft, _ in pairs),
            "nst": lambda: sum(gram_loss(c(fs), ft) for fs, ft, c in pairs),
            "fm": lambda: sum(F.mse_loss(c(fs).mean((2, 3)), ft.mean((2, 3))) for fs, ft, c in pairs),
        }
        weighted = torch.stack([path_loss[k]() for k in p.paths]) * self.path_weights
        terms, regulariser = aggregate(weighted, self.log_vars)
        losses = {"ce": F.cross_entropy(logits, labels)}
        losses.update({path: p.distill_weight * term for path, term in zip(p.paths, terms, strict=True)})
        if self.log_vars is not None:
            losses["sum_a"] = p.distill_weight * regulariser
        return logits, losses
