"""Information-flow KD with an auxiliary proxy teacher (Passalis, Tzelepi & Tefas, "Heterogeneous Knowledge
Distillation using Information Flow Modeling", CVPR 2020, arXiv 2005.00727).

Two methods, two stages of one recipe (methods reference section 13; official code passalis/pkth):
- `infoflow_proxy`: the auxiliary (proxy) teacher, a network close to the student's size, learns to mimic the
  teacher's final representation (stage A: one pair, teacher's pooled penultimate vector to the proxy's, weight 1).
  The official proxy starts from its own cross-entropy weights: `ce_epochs` epochs of cross-entropy alone come
  first in the same stage.
- `infoflow`: the student mimics the proxy's information flow, the similarity structure of the batch at every tap
  (stage B: proxy taps to student taps, deepest first).

Layer loss (the paper's information-flow divergence as in `pkt_transfer.py`, the "combined" kernels with the
Jeffreys divergence): for features flattened to B x D, `K1_ij = (1 + <x^_i, x^_j>) / 2` with
`x^ = x / (||x|| + 1e-6)`, `K2_ij = 1 / (1 + d_ij)` with `d_ij = sqrt(max(||x_i||^2 + ||x_j||^2 - 2 <x_i, x_j>, 0)
+ 1e-6)`, `P = K / rowsum(K)` (diagonal kept), and `L = sum over both kernels of mean_ij (P_t - P_s)(log P_t -
log P_s)`.

Critical-period schedule (the paper's critical-period-aware weighting, with the code's constants): in epoch e
(from 0) the deepest pair has weight 1 and every other pair `100 * 0.7^e`: the intermediate layers lead while the
network's connectivity forms (e <= 12), and from e = 26 on (weight < 0.01) the last layer drives. The weights are
logged per epoch and plotted.

Taps, as the official code takes them: stage B's proxy and student maps are flattened whole, unpooled
(`models/cifar_tiny.py` and `models/cifar_very_tiny.py`, `get_features`: `# out_t = F.avg_pool2d(out, 2)` is
commented out and `out_t = out.view(out.size(0), -1)` kept, for layers 0, 1 and 2), paired from the deepest
(`cifar10/exp2_proposed.py`: `student_layers, teacher_layers = (3, 2, 1, 0), (3, 2, 1, 0)`, weights
`(1, cur_weight, cur_weight, cur_weight)`). The one pooling `get_features` in that code is the ResNet-18 teacher's
(`models/resnet.py`: `F.avg_pool2d(out, 8)` and `(out, 4)`), which stage A reads only at layer 3, the pooled
penultimate vector. kdpipe taps each model's stage outputs and pooled penultimate vector. `pool_maps: N` pools
each map larger than N x N to N x N first, a kdpipe option and not the paper's: the B x B kernels of large maps
(224-pixel images) then cost B x C x N^2 instead of B x C x H x W.

Choices where the reference leaves room ('confirm'):
- A label term `ce_weight * CE` (default 1): the official code evaluates retrieval on features and has none, but a
  kdpipe stage is a classifier scored by top-1, so something must train the classification layer. Set 0 for the
  code's exact loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdpipe.methods.base import Epochs, Method, Params, PositiveWeight, Weight
from kdpipe.models.features import pair_deepest, pooled_node, stage_nodes

KERNEL_EPS = 1e-6


def flow_probabilities(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two row-normalised kernels of a batch: cosine, and 1 / (1 + Euclidean distance)."""
    x = features.flatten(1)
    unit = x / (x.norm(dim=1, keepdim=True) + KERNEL_EPS)
    cosine = (1 + unit @ unit.T) / 2
    squared = (x * x).sum(1)
    distance = torch.sqrt((squared[:, None] + squared[None, :] - 2 * x @ x.T).clamp(min=0) + KERNEL_EPS)
    inverse = 1 / (1 + distance)
    return cosine / cosine.sum(1, keepdim=True), inverse / inverse.sum(1, keepdim=True)


def flow_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Jeffreys divergence between the teacher's and the student's kernels, summed over both kernels."""
    return sum(
        ((p_t - p_s) * (p_t.log() - p_s.log())).mean()
        for p_t, p_s in zip(flow_probabilities(teacher), flow_probabilities(student), strict=True)
    )


def flattened(feature: torch.Tensor, pool: int | None) -> torch.Tensor:
    """A tap as B x D; a map larger than `pool` x `pool` is average-pooled to that size first."""
    if pool is not None and feature.dim() == 4 and max(feature.shape[-2:]) > pool:
        feature = F.adaptive_avg_pool2d(feature, pool)
    return feature.flatten(1)


class ProxyParams(Params):
    ce_epochs: Epochs = Field(0, description="epochs of cross-entropy alone before mimicking the teacher")
    ce_weight: Weight = 1.0
    weight: PositiveWeight = Field(1.0, description="weight of the flow loss on the final representation")


class InfoFlowProxy(Method):
    name = "infoflow_proxy"
    paper = "Passalis et al., CVPR 2020, arXiv 2005.00727 (stage A: the proxy teacher)"
    Params = ProxyParams
    min_teachers = max_teachers = 1

    def __init__(self, student, teachers, params: ProxyParams, **setting):
        super().__init__(student, teachers, params, **setting)
        self.pooled = pooled_node(student), pooled_node(self.teachers[0])
        self.tap("student", student, [self.pooled[0]])
        self.tap("teacher", self.teachers[0], [self.pooled[1]])

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        p = self.params
        logits, proxy = self.features("student", images)
        losses = {"ce": (1.0 if self.epoch < p.ce_epochs else p.ce_weight) * F.cross_entropy(logits, labels)}
        if self.epoch >= p.ce_epochs:
            _, teacher = self.features("teacher", images)
            losses["flow"] = p.weight * flow_loss(teacher[self.pooled[1]], proxy[self.pooled[0]])
        return logits, losses


class InfoFlowParams(Params):
    critical_weight: PositiveWeight = Field(100.0, description="intermediate layers' weight in epoch 0")
    decay: float = Field(0.7, gt=0, le=1, description="the intermediate weight's factor per epoch")
    final_weight: PositiveWeight = Field(1.0, description="the deepest pair's weight")
    ce_weight: Weight = 1.0
    student_nodes: list[str] | None = Field(None, description="student taps (default: stage outputs and pooled vector)")
    teacher_nodes: list[str] | None = Field(None, description="proxy taps, paired with the student's from the deepest")
    pool_maps: int | None = Field(
        None, ge=1, le=64, description="pool maps to at most N x N before their kernels (unset: unpooled, the paper's)"
    )


class InfoFlow(Method):
    name = "infoflow"
    version = 2  # maps unpooled by default, as the official code takes them (version 1 pooled them to 4 x 4)
    paper = "Passalis et al., CVPR 2020, arXiv 2005.00727 (stage B: the student)"
    Params = InfoFlowParams
    min_teachers = max_teachers = 1

    def __init__(self, student, teachers, params: InfoFlowParams, **setting):
        super().__init__(student, teachers, params, **setting)
        proxy = self.teachers[0]
        self.pairs = pair_deepest(
            params.student_nodes or [*stage_nodes(student, self.image_size), pooled_node(student)],
            params.teacher_nodes or [*stage_nodes(proxy, self.image_size), pooled_node(proxy)],
        )
        self.tap("student", student, [s for s, _ in self.pairs])
        self.tap("teacher", proxy, [t for _, t in self.pairs])

    def layer_weights(self) -> list[float]:
        """The critical-period schedule at the current epoch, shallow to deep."""
        p = self.params
        return [p.critical_weight * p.decay**self.epoch] * (len(self.pairs) - 1) + [p.final_weight]

    def epoch_metrics(self) -> dict[str, float]:
        return {f"infoflow/weight_{s}": w for (s, _), w in zip(self.pairs, self.layer_weights(), strict=True)}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        logits, student = self.features("student", images)
        _, teacher = self.features("teacher", images)
        pool = self.params.pool_maps
        flow = sum(
            w * flow_loss(flattened(teacher[t], pool), flattened(student[s], pool))
            for (s, t), w in zip(self.pairs, self.layer_weights(), strict=True)
        )
        return logits, {"ce": self.params.ce_weight * F.cross_entropy(logits, labels), "flow": flow}
