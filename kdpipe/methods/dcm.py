"""DCM: dense cross-layer mutual distillation (Yao & Sun, "Knowledge Transfer via Dense Cross-Layer Mutual-
Distillation", ECCV 2020, arXiv 2008.07816).

Two networks train together from scratch. Each gets auxiliary classifiers on hidden layers beside its own final
classifier, and knowledge flows densely and both ways between the networks (the paper's method section): with outputs
o = [c1, ..., cK of net 1, c1, ..., cK of net 2],
`L = sum_m CE(o_m, y) + sum over ordered pairs (m, r) in different networks of KL(softmax(o_r) || softmax(o_m))`,
o_r detached, T = 1, all weights 1: for K = 3, 18 KL terms covering same-level and cross-level pairs both ways, none
within one network (the official code; methods reference section 12). KL uses the official smoothing
`(p + 1e-8) / (1 + C 1e-8)`, summed over classes and averaged over the batch.

Auxiliary heads (a choice; the reference marks the paper's variants 'confirm'): the official WRN code branches after
groups 0 and 1 with copies of the later groups. For any model here a head on a tapped map is two 3x3 conv-BN-ReLU
blocks (the first with stride 2 and twice the width), global pooling and a linear classifier: one block of
downsampling like a WRN group, at a fraction of a group copy's cost. Default taps are every stage output but the
last (two auxiliary heads per CIFAR ResNet, as the paper's c1 and c2). The heads are training scaffolding: the saved
weights of both networks are the plain models, without them.

The stage's `model` is net 1 and `peer` is net 2; both are evaluated and saved (net 2 under `peers/peer/`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdpipe.methods.base import Method, Params
from kdpipe.models import build_model
from kdpipe.models.features import stage_nodes

SMOOTHING = 1e-8


class AuxHead(nn.Sequential):
    def __init__(self, channels: int, num_classes: int):
        width = 2 * channels
        super().__init__(
            nn.Conv2d(channels, width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )


def smoothed_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_target || p) with both smoothed as (p + 1e-8) / (1 + C 1e-8); summed over classes, batch mean."""
    classes = logits.shape[1]
    p_target = (F.softmax(target_logits, dim=1) + SMOOTHING) / (1 + classes * SMOOTHING)
    p = (F.softmax(logits, dim=1) + SMOOTHING) / (1 + classes * SMOOTHING)
    return (p_target * (p_target.log() - p.log())).sum(1).mean()


class DCMParams(Params):
    peer: str | None = Field(None, description="net 2's model (default: the stage's model)")
    student_nodes: list[str] | None = Field(None, description="net 1's layers with auxiliary heads")
    peer_nodes: list[str] | None = Field(None, description="net 2's layers with auxiliary heads")


class DCM(Method):
    name = "dcm"
    paper = "Yao & Sun, ECCV 2020, arXiv 2008.07816"
    Params = DCMParams
    max_teachers = 0

    def __init__(self, student, teachers, params: DCMParams, **setting):
        super().__init__(student, teachers, params, **setting)
        self.peer_model = params.peer or self.model
        self.peer = build_model(self.peer_model, self.num_classes)
        self.nodes = {
            "student": params.student_nodes or stage_nodes(student, self.image_size)[:-1],
            "peer": params.peer_nodes or stage_nodes(self.peer, self.image_size)[:-1],
        }
        heads = {}
        for key, net in (("student", student), ("peer", self.peer)):
            shapes = self.tap(key, net, self.nodes[key])
            heads[key] = nn.ModuleList(AuxHead(shapes[n][0], self.num_classes) for n in self.nodes[key])
        self.heads = nn.ModuleDict(heads)

    def peers(self) -> dict[str, tuple[str, nn.Module]]:
        return {"peer": (self.peer_model, self.peer)}

    def outputs(self, key: str, images: torch.Tensor) -> list[torch.Tensor]:
        """The auxiliary classifiers' logits, shallow to deep, then the network's own."""
        logits, features = self.features(key, images)
        return [head(features[n]) for head, n in zip(self.heads[key], self.nodes[key], strict=True)] + [logits]

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        net1, net2 = self.outputs("student", images), self.outputs("peer", images)
        ce = sum(F.cross_entropy(o, labels) for o in net1 + net2)
        kl = sum(smoothed_kl(r.detach(), m) for m in net1 for r in net2) + sum(
            smoothed_kl(r.detach(), m) for m in net2 for r in net1
        )
        return net1[-1], {"ce": ce, "kl": kl}
