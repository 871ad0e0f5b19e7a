"""Default feature taps for every model family: N x C x H x W maps with the channel counts of the model's own
stages (channels-last stages permuted, ViT tokens made maps), and `validate` refusing in one line a pair whose
features cannot be read. Blank models, no training: each case is a forward pass or two."""

from __future__ import annotations

import math

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
    # timm's, through their feature_info
    "timm:resnet18": (64, [64, 128, 256, 512]),
    "timm:convnext_atto": (64, [40, 80, 160, 320]),  # ConvNeXt-Atto stages
    "timm:efficientnet_b0": (64, [24, 40, 112, 320]),  # its feature_info's stages (the head conv is not one)
    "timm:swin_tiny_patch4_window7_224": (64, [96, 192, 384, 768]),  # N x H x W x C stages, as torchvision's Swin
    "timm:vit_tiny_patch16_224": (32, [192, 192, 192, 192]),  # ViT-Ti: 12 blocks of 192, on 32 px in 4 px patches
}
ARGS = {
    "timm:swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 4},
    "timm:vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
}


@pytest.mark.parametrize("name", FAMILIES)
def test_default_taps_are_maps_with_the_stage_widths(name) -> None:
    size, widths = FAMILIES[name]
    model = build_model(name, 10, ARGS.get(name))
    nodes = stage_nodes(model, size)
    shapes = feature_shapes(Taps(model, nodes), size)
    assert [shape[0] for shape in shapes.values()] == widths, shapes
    sides = [shape[1] for shape in shapes.values()]
    assert all(len(shape) == 3 and shape[1] == shape[2] for shape in shapes.values())
    if "vit" in name:
        assert sides == [size // (4 if "timm" in name else 16)] * 4  # the class token dropped: the patches' grid
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


TINY_VIT = ("timm:vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2})


@pytest.mark.parametrize("method", ["fitnets", "at", "pkt", "infoflow"])
@pytest.mark.parametrize("vit_teaches", [True, False], ids=["vit-teacher", "vit-student"])
def test_a_timm_vit_and_a_cnn_distil_either_way(process_group, method, vit_teaches) -> None:
    """One epoch of the engine with a tiny timm ViT teacher and a CIFAR ResNet student, and the other way round:
    every loss finite, the distillation term among them."""
    from kdpipe.job.spec import StageSpec
    from kdpipe.methods import METHODS
    from kdpipe.worker.engine import Engine
    from tests.test_engine import BATCH, CLASSES, SIZE, Blobs, Recorder, train

    torch.manual_seed(0)
    vit, cnn = (TINY_VIT, ("resnet8", {}))
    (student_name, student_args), (teacher_name, teacher_args) = (cnn, vit) if vit_teaches else (vit, cnn)
    spec = StageSpec(name="s", model=student_name, model_args=student_args, method=method, teachers=["t"], epochs=1)
    cls = METHODS[method]
    student = build_model(student_name, CLASSES, student_args)
    teacher = build_model(teacher_name, CLASSES, teacher_args)
    module = cls(student, [teacher], cls.Params(), model=student_name, num_classes=CLASSES, image_size=SIZE)
    recorder = Recorder()
    train(Engine(module, spec, BATCH, torch.device("cpu")), Blobs(), recorder)
    [epoch] = recorder.epochs
    distilled = {key for key in epoch if key.startswith("train/") and key not in ("train/loss", "train/ce")}
    assert distilled and all(math.isfinite(value) for value in epoch.values()), epoch


@pytest.mark.parametrize(
    ("model", "args", "expected"),
    [
        ("resnet8", {"width": 2}, ["stages[0].model_args", "resnet8", "takes no model_args"]),
        ("timm:resnet18", {"depth_multiplier": 2}, ["stages[0].model_args", "timm:resnet18", "depth_multiplier"]),
        ("timm:resnet1800", {}, ["stages[0].model", "unknown model 'timm:resnet1800'", "timm:<a timm model>"]),
    ],
)
def test_a_model_its_constructor_refuses_is_one_line(model, args, expected, tmp_path, capsys) -> None:
    stages = [{"name": "teacher", "model": model, "model_args": args, "epochs": 1}]
    assert main(["validate", str(write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages)))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(part in err for part in expected), err


def test_a_batch_reaches_a_model_in_its_own_normalization_and_size() -> None:
    """Pixels normalized by the data's statistics, adapted, equal the same pixels normalized by the model's (and
    resized to its image size); the model and its feature taps both take the adapted batch."""
    from kdpipe.models.inputs import ModelInput, adapt_input, input_adapter

    data_mean, data_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    wanted = ModelInput((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 48)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    column = lambda values: torch.tensor(values).view(1, 3, 1, 1)  # noqa: E731
    batch = (pixels - column(data_mean)) / column(data_std)
    adapt = input_adapter(data_mean, data_std, wanted, torch.device("cpu"))
    own = torch.nn.functional.interpolate(
        (pixels - column(wanted.mean)) / column(wanted.std), size=(48, 48), mode="bilinear"
    )
    torch.testing.assert_close(adapt(batch), own)

    model = build_model("resnet8", 10).eval()
    with torch.no_grad():
        direct = model(own)
        adapt_input(model, adapt)
        logits, _ = Taps(model, stage_nodes(model, 32)).eval()(batch)
        torch.testing.assert_close(model(batch), direct)
    torch.testing.assert_close(logits, direct)


def test_a_model_with_its_own_input_is_tapped_at_its_own_resolution() -> None:
    """A teacher taking 64 px (its input adapted) under a 16 px student has the taps it has at 64 px."""
    from kdpipe.models.inputs import ModelInput, adapt_input, input_adapter

    model = build_model("mobilenet_v3_small", 10)
    own = stage_nodes(model, 64)
    adapt_input(model, input_adapter((0.5,) * 3, (0.25,) * 3, ModelInput(None, None, 64), torch.device("cpu")))
    assert stage_nodes(model, 16) == own
