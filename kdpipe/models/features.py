"""Intermediate features by name, and connectors that make a student's features comparable with a teacher's.

Features come from torchvision's `create_feature_extractor`: one traced pass returns the logits and every named
node, and the traced module calls the model's own submodules, so it shares their weights and BN state. Node names
are those of `torchvision.models.feature_extraction.get_graph_node_names`; each model family has defaults (its
stage outputs, shallow to deep), and a job file may name others.
"""

from __future__ import annotations

import torch
from torch import nn

POOLED = "flatten"  # the pooled penultimate vector, in the CIFAR ResNets and torchvision's CNNs alike


def stage_nodes(model: nn.Module, image_size: int) -> list[str]:
    """The model family's default taps: the output of each stage, shallow to deep.

    ResNets (CIFAR and torchvision): `layer1`.. (the post-ReLU stage outputs RepDistiller taps as f1..f3). Models
    with a `features` sequence (MobileNets, EfficientNets, VGG, ...): its last block at each spatial size, found by
    running one blank image through it. Others have no default; the job file names nodes for them.
    """
    layers = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if layers:
        return layers
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        last_at_size: dict[int, str] = {}
        x = torch.zeros(1, 3, image_size, image_size)
        was_training = features.training  # a frozen teacher stays in eval mode
        with torch.no_grad():
            for index, block in enumerate(features.eval()):
                x = block(x)
                last_at_size[x.shape[-1]] = f"features.{index}"
        features.train(was_training)
        return list(last_at_size.values())[1:]  # the first is the stem's: too early to carry knowledge
    raise ValueError(f"no default feature nodes for {type(model).__name__}; name them in the job file")


def pair_deepest(student: list[str], teacher: list[str]) -> list[tuple[str, str]]:
    """Student and teacher taps paired in order; with unequal counts the deepest are paired, a choice the papers
    (which compare networks of one family) leave open."""
    count = min(len(student), len(teacher))
    return list(zip(student[len(student) - count :], teacher[len(teacher) - count :], strict=True))


class Taps(nn.Module):
    """`model(images)` as `(logits, {node: feature})`, from one traced pass over the model's own modules.

    Not registered under the model, so a state dict never holds the weights twice; its train/eval graph follows
    `train()` like any module's.
    """

    def __init__(self, model: nn.Module, nodes: list[str]):
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        super().__init__()
        train_nodes, eval_nodes = get_graph_node_names(model)
        outputs = {node: node for node in nodes}
        self.graph = create_feature_extractor(
            model,
            train_return_nodes={**outputs, train_nodes[-1]: "logits"},
            eval_return_nodes={**outputs, eval_nodes[-1]: "logits"},
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.graph(images)
        return out.pop("logits"), out


def feature_shapes(taps: Taps, image_size: int) -> dict[str, torch.Size]:
    """Each node's output shape for one image, from a blank image in eval mode."""
    was_training = taps.training
    weight = next(taps.parameters())
    with torch.no_grad():
        _, features = taps.eval()(torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype))
    taps.train(was_training)
    return {node: value.shape[1:] for node, value in features.items()}


class Connector(nn.Sequential):
    """A student feature map brought to the teacher's width: a bias-free 1x1 conv and BN (the adaptation layer of
    FitNets-style methods and of AdaptiveDistillation, section 14 of the methods reference)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(teacher_channels))


def same_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the other's spatial size (the AT reference's rule)."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-1] > teacher.shape[-1]:
        return nn.functional.adaptive_avg_pool2d(student, teacher.shape[-2:]), teacher
    return student, nn.functional.adaptive_avg_pool2d(teacher, student.shape[-2:])
