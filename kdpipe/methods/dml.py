"""DML: deep mutual learning (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018, arXiv 1706.00384).

Two or more peers learn together from scratch, with no pretrained teacher. Peer i minimises the paper's per-network loss
`L_i = CE(z_i, y) + sum over j != i of KL(softmax(z_j) || softmax(z_i))` at temperature 1, each other peer's
distribution held constant (detached; in the official TensorFlow code only peer i's variables get L_i's
gradients). The official code sums over peers; the paper averages with 1/(K - 1); they agree for two peers, and
`mean_over_peers: true` gives the paper's form. The reference's 1e-8 smoothing changes nothing measurable and is
left out (KL summed over classes, averaged over the batch).

Update order (a choice; methods reference section 11): one optimiser step over all peers with the summed losses.
Since each L_i's targets are detached, every peer gets exactly its own L_i's gradient against the others' current
predictions: the simultaneous form of the paper's alternating updates, at one forward pass per peer.

The stage's `model` is the first peer (its weights are the stage's, what later stages learn from); `peers` names
the others. Every peer is evaluated (`val/<peer>/top1`) and saved under the run's `peers/<name>/` artifacts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdpipe.methods.base import Method, Params
from kdpipe.models import build_model


def mutual_kl(logits: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """sum over the other peers of KL(softmax(z_j) || softmax(z_i)), z_j detached; batch-mean KL."""
    log_p = F.log_softmax(logits, dim=1)
    return sum(
        F.kl_div(log_p, F.log_softmax(other.detach(), dim=1), reduction="batchmean", log_target=True)
        for other in others
    )


class DMLParams(Params):
    peers: list[str] = Field(
        default_factory=list, description="models of the other peers (default: one more of the stage's model)"
    )
    mean_over_peers: bool = Field(False, description="average the KL terms over peers (paper) instead of summing")


class DML(Method):
    name = "dml"
    paper = "Zhang et al., CVPR 2018, arXiv 1706.00384"
    Params = DMLParams
    max_teachers = 0

    def __init__(self, student, teachers, params: DMLParams, **setting):
        super().__init__(student, teachers, params, **setting)
        self.peer_models = params.peers or [self.model]
        self.others = nn.ModuleList(build_model(name, self.num_classes) for name in self.peer_models)

    def peers(self) -> dict[str, tuple[str, nn.Module]]:
        pairs = zip(self.peer_models, self.others, strict=True)
        return {f"peer{i}": (name, net) for i, (name, net) in enumerate(pairs, 1)}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor):
        nets = [self.student, *self.others]
        logits = [net(images) for net in nets]
        scale = 1 / (len(nets) - 1) if self.params.mean_over_peers else 1.0
        losses = {}
        for i, z in enumerate(logits):
            suffix = "" if i == 0 else f"_peer{i}"
            losses[f"ce{suffix}"] = F.cross_entropy(z, labels)
            losses[f"kl{suffix}"] = scale * mutual_kl(z, logits[:i] + logits[i + 1 :])
        return logits[0], losses
