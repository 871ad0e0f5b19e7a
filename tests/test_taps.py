"""Default feature taps for every model family: N x C x H x W maps with the channel counts of the model's own
stages (channels-last stages permuted, ViT tokens made maps), and `validate` refusing in one line a pair whose
features cannot be read. Blank models, no training: each case is a forward pass or two."""

from __future__ import annotations

import pytest
import torch
import torchvision

from kdpipe.cli import main
from kdpipe.models import build_model
from kdpipe.models.features import Taps, as_map, feature_shapes, pooled_node, stage_nodes
from tests.conftest import tiny_job, write_job

# Each family's stage widths from its architecture's definition (torchvision's builders, the papers' tables); the
# taps are the last stage at each resolution, so a family may skip stages that keep one.
FAMILIES = {
    "resnet18": (64, [64, 128, 256, 512]),
    "resnet8": (32, [16, 32, 64]),  # kdpipe's CIFAR ResNet
    "mobilenet_v3_small": (64, [16, 24, 48, 576]),  # bneck outputs 16 | 24 24 | 40 40 40 48 48 | 96 96 96, conv 576
    "efficientnet_b0": (64, [24, 40, 112, 1280]),  # MBConv stages 16 24 40 80 112 192 320, head conv 1280
    "regnet_x_400mf": (64, [32, 64, 160, 400]),  # RegNetX-400MF widths
    "convnext_tiny": (64, [96, 192, 384, 768]),  # ConvNeXt-T stages
    "swin_t": (64, [96, 192, 384, 768]),  # Swin-T stages, whose outputs are N x H x W x C
    "densenet121": (64, [256, 512, 1024, 1024]),  # dense blocks 1-3, and block 4 after its final norm
    "mnasnet0_5": (64, [16, 24, 48, 1280]),  # MNASNet-0.5 stacks, head conv 1280
    "vit_b_16": (224, [768, 768, 768, 768]),  # ViT-B/16: 12 blocks of 768 on 14 x 14 patches, tapped every third
}


@pytest.mark.parametrize("name", FAMILIES)
def test_default_taps_are_maps_with_the_stage_widths(name) -> None:
    size, widths = FAMILIES[name]
    model = build_model(name, 10)
    nodes = stage_nodes(model, size)
    shapes = feature_shapes(Taps(model, nodes), size)
    assert [shape[0] for shape in shapes.values()] == widths, shapes
    sides = [shape[1] for shape in shapes.values()]
    assert all(len(shape) == 3 and shape[1] == shape[2] for shape in shapes.values())
    if name.startswith("vit"):
        assert sides == [size // 16] * 4  # the class token dropped: 196 patches as 14 x 14
    else:
        assert sides == sorted(sides, reverse=True) and len(set(sides)) == len(sides)


def test_a_channels_last_stage_is_read_as_its_channels_first_map() -> None:
    model = torchvision.models.swin_t(num_classes=10).eval()
    taps = Taps(model, ["features.1"])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, features = taps(images)
        direct = model.features[:2](images)  # N x 16 x 16 x 96, as Swin keeps it
    torch.testing.assert_close(features["features.1"], direct.permute(0, 3, 1, 2))


def test_tokens_become_maps_without_class_and_register_tokens() -> None:
    patches = torch.arange(2 * 16 * 8, dtype=torch.float32).reshape(2, 16, 8)
    tokens = torch.cat([torch.full((2, 5, 8), -1.0), patches], 1)  # a class token and 4 registers first
    maps = as_map(tokens)
    assert maps.shape == (2, 8, 4, 4)
    torch.testing.assert_close(maps[:, :, 1, 2], patches[:, 6])  # row 1, column 2 is patch 1 * 4 + 2


@pytest.mark.parametrize(("name", "node"), [("resnet18", "flatten"), ("vit_b_16", "getitem_5"), ("swin_t", "flatten")])
def test_the_pooled_vector_is_what_the_classifier_reads(name, node) -> None:
    assert pooled_node(build_model(name, 10)) == node


def test_validate_refuses_a_pair_whose_features_cannot_be_read(tmp_path, capsys) -> None:
    """torchvision's ViT-B/16 takes 224 x 224 images only: at 32 px a PKT student cannot read it."""
    stages = [
        {"name": "teacher", "model": "vit_b_16", "epochs": 1},
        {"name": "student", "model": "resnet8", "teachers": ["teacher"], "method": "pkt", "epochs": 1},
    ]
    path = write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert all(part in err for part in ("stages[1]", "'pkt'", "resnet8", "vit_b_16", "Expected 224")), err
