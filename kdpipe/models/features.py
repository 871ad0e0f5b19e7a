"""Intermediate features by name, and connectors that make a student's features comparable with a teacher's.

Features come from torchvision's `create_feature_extractor`: one traced pass returns the logits and every named
node, and the traced module calls the model's own submodules, so it shares their weights and BN state. Node names
are those of `torchvision.models.feature_extraction.get_graph_node_names`; each model family has defaults (its
stage outputs, shallow to deep), and a job file may name others.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ISOTROPIC_TAPS = 4  # taps of a model whose blocks keep one resolution (a ViT): evenly spaced blocks
STEM_STRIDE = 4  # what a stem takes the resolution down by before the first stage (ResNets, ConvNeXts, Swins)


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A node's output as kdpipe's methods read it: N x C x H x W maps, or N x D vectors as they are.

    Images are square, so the two equal dimensions are the spatial ones: N x H x W x C outputs (Swin's stages) are
    permuted. N x T x C tokens (a ViT's blocks) become maps, with the class and register tokens (the T - g*g first,
    g = floor(sqrt(T))) dropped."""
    if feature.dim() == 3:
        side = math.isqrt(feature.shape[1])
        grid = feature[:, feature.shape[1] - side * side :]
        return grid.transpose(1, 2).reshape(feature.shape[0], feature.shape[2], side, side)
    if feature.dim() == 4 and feature.shape[1] == feature.shape[2] != feature.shape[3]:
        return feature.permute(0, 3, 1, 2)
    return feature


def head_child(model: nn.Module) -> str:
    """The top-level child that holds the classifier: the last one with parameters (fc, head, heads, classifier)."""
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())][-1]


def pooled_node(model: nn.Module) -> str:
    """The node that hands the classifier its input: the pooled penultimate vector of a CNN (`flatten`), a ViT's
    class token. The classifier is a timm model's own (`get_classifier`), else the child that holds it."""
    from torchvision.models.feature_extraction import get_graph_node_names

    head = head_child(model)
    if hasattr(model, "get_classifier"):
        head = next(name for name, module in model.named_modules() if module is model.get_classifier())
    nodes = get_graph_node_names(model)[1]
    first = next(i for i, node in enumerate(nodes) if node == head or node.startswith(f"{head}."))
    return nodes[first - 1]


def stage_nodes(model: nn.Module, image_size: int) -> list[str]:
    """The model family's default taps: the output of each stage, shallow to deep.

    ResNets (CIFAR and torchvision): `layer1`.. (the post-ReLU stage outputs RepDistiller taps as f1..f3). A timm
    model: the stages its `feature_info` lists. Any other model: one blank image is run through it and every
    module's output read as a map (`as_map`); its trunk is the set of sibling modules whose outputs take the most
    resolutions (`features.*` of MobileNets, EfficientNets, ConvNeXts and Swins, `trunk_output.*` of RegNets, the
    top-level modules of a ShuffleNet). Either way the taps are the last stage at each resolution from a quarter of
    the image's on (finer ones are the stem's: too early to carry knowledge, and where ResNets' first stage starts
    too); a model that keeps one resolution throughout (a ViT) is tapped at evenly spaced blocks."""
    layers = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}") and not hasattr(model, "feature_info")]
    if layers:
        return layers
    info = getattr(model, "feature_info", None)
    if info:
        return stages_of({entry["module"]: image_size // entry["reduction"] for entry in info}, image_size)
    side, sizes = output_sizes(model, image_size)
    siblings: dict[str, dict[str, int]] = {}
    for name, size in sizes.items():
        siblings.setdefault(name.rpartition(".")[0], {})[name] = size
    trunk = max(siblings.values(), key=lambda sizes: (len(set(sizes.values())), len(sizes)))
    return stages_of(trunk, side)


def stages_of(sides: dict[str, int], image_size: int) -> list[str]:
    """Stage taps from blocks in order with their output sides (`stage_nodes`)."""
    if len(set(sides.values())) > 1:
        last_at_side = {side: name for name, side in sides.items()}
        stages = [name for side, name in last_at_side.items() if side <= image_size // STEM_STRIDE]
        return stages or list(last_at_side.values())
    count = min(ISOTROPIC_TAPS, len(sides))
    blocks = list(sides)
    return [blocks[round((i + 1) * len(blocks) / count) - 1] for i in range(count)]


def output_sizes(model: nn.Module, image_size: int) -> tuple[int, dict[str, int]]:
    """The side of the image the model takes (its own, where its input is adapted) and each module's output
    resolution on a blank image (as a map), up to the classifier, in the order the modules finish; global pooling
    is not a stage."""
    head = head_child(model)
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    sizes: dict[str, int] = {}
    side = [image_size]

    def record(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() in (3, 4):
                sizes.pop(name, None)
                sizes[name] = as_map(output).shape[-1]

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name and name != head and not name.startswith(f"{head}.") and not isinstance(module, pools)
    ]
    hooks.append(model.register_forward_pre_hook(lambda _model, args: side.__setitem__(0, args[0].shape[-1])))
    was_training = model.training  # a frozen teacher stays in eval mode
    weight = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not sizes:
        raise ValueError(f"no default feature nodes for {type(model).__name__}; name them in the job file")
    return side[0], sizes


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
        self.adapt = getattr(model, "input_adapter", None)  # a teacher's own input (`kdpipe.models.inputs`)
        train_nodes, eval_nodes = get_graph_node_names(model)
        outputs = {node: node for node in nodes}
        self.graph = create_feature_extractor(
            model,
            train_return_nodes={**outputs, train_nodes[-1]: "logits"},
            eval_return_nodes={**outputs, eval_nodes[-1]: "logits"},
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.graph(self.adapt(images) if self.adapt else images)
        return out.pop("logits"), {node: as_map(value) for node, value in out.items()}


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
