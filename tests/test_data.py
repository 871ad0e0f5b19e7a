"""Data: synthetic images, real tar shards and their manifest, and each reader on small real copies."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from kdpipe.data import prepare_data
from kdpipe.data.convert import convert
from kdpipe.data.loaders import open_data, random_crop_flip
from kdpipe.data.shards import read_manifest, sha256_file
from kdpipe.data.synthetic import write_image_folder
from kdpipe.job.spec import DataSpec
from tests.conftest import FASHION_MNIST


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root, classes=4, size=16, train_size=90, val_size=30, seed=1)
    return root


def test_synthetic_folder_is_balanced_jpegs(image_folder):
    for split, per_class in (("train", [23, 23, 22, 22]), ("val", [8, 8, 7, 7])):
        folders = sorted((image_folder / split).iterdir())
        assert [p.name for p in folders] == ["class_00", "class_01", "class_02", "class_03"]
        assert [len(list(f.glob("*.jpg"))) for f in folders] == per_class
    assert (image_folder / "train/class_00/000000.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG magic


def test_shards_match_source_and_manifest(image_folder, tmp_path):
    manifest = convert(image_folder, tmp_path, shard_size=25, workers=1)
    assert manifest == read_manifest(tmp_path)
    assert manifest["classes"] == ["class_00", "class_01", "class_02", "class_03"]
    train = manifest["splits"]["train"]
    assert train["count"] == 90 and [s["count"] for s in train["shards"]] == [25, 25, 25, 15]
    source = {p.read_bytes() for p in (image_folder / "train").rglob("*.jpg")}
    stored, labels = set(), []
    for shard in train["shards"]:
        path = tmp_path / shard["name"]
        assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    stored.add(data)
                else:
                    labels.append(int(data))
    assert stored == source  # JPEG bytes kept as they were, not re-encoded
    assert sorted(np.bincount(labels)) == [22, 22, 23, 23]


def test_shard_reader_gives_every_rank_the_same_number_of_batches(image_folder, tmp_path):
    convert(image_folder, tmp_path, shard_size=25, workers=1)  # 4 shards of 25, 25, 25, 15 over 2 ranks
    spec = DataSpec(source="shards", path=str(tmp_path), image_size=16, batch_size=8, loader_workers=0)
    prepared = prepare_data(spec)
    readers = [open_data(prepared, spec, 0, rank, 2) for rank in range(2)]
    for epoch in range(3):
        steps = {r.steps_per_epoch(epoch) for r in readers}
        assert len(steps) == 1
        counts = []
        for reader in readers:
            batches = list(reader.train_batches(epoch))
            assert all(images.shape == (8, 3, 16, 16) for images, _ in batches)
            counts.append(len(batches))
        assert counts == [steps.pop()] * 2 == [90 // 16] * 2


def test_imagefolder_reader(image_folder):
    spec = DataSpec(source="imagefolder", path=str(image_folder), image_size=16, batch_size=10, loader_workers=0)
    prepared = prepare_data(spec)
    assert prepared.kind == "imagefolder" and prepared.num_classes == 4
    readers = [open_data(prepared, spec, 0, rank, 2) for rank in range(2)]
    images, labels = next(readers[0].train_batches(0))
    assert images.shape == (10, 3, 16, 16) and labels.dtype == torch.long
    assert sum(len(y) for r in readers for _, y in r.val_batches()) == 30  # each held-out image once


def write_small_cifar(root, n_train=50, n_test=20):
    """A small copy in torchvision's CIFAR-10 python format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def test_cifar_reader_on_small_copy(tmp_path, monkeypatch):
    folder = write_small_cifar(tmp_path)
    # The checksums torchvision checks are those of the real release; point them at the small copy's files.
    for attr in ("train_list", "test_list"):
        entries = [[name, sha_md5(folder / name)] for name, _ in getattr(datasets.CIFAR10, attr)]
        monkeypatch.setattr(datasets.CIFAR10, attr, entries)
    monkeypatch.setitem(datasets.CIFAR10.meta, "md5", sha_md5(folder / "batches.meta"))
    spec = DataSpec(source="cifar", path=str(tmp_path), classes=10, batch_size=16)
    reader = open_data(prepare_data(spec), spec, 0, 0, 1)
    assert reader.num_classes == 10 and reader.steps_per_epoch(0) == 250 // 16
    images, labels = next(reader.train_batches(0))
    assert images.shape == (16, 3, 32, 32) and labels.max() < 10
    assert sum(len(y) for _, y in reader.val_batches()) == 20


def test_cifar_converts_to_lossless_png_shards(tmp_path, monkeypatch):
    (tmp_path / "cifar").mkdir()
    folder = write_small_cifar(tmp_path / "cifar")
    for attr in ("train_list", "test_list"):
        entries = [[name, sha_md5(folder / name)] for name, _ in getattr(datasets.CIFAR10, attr)]
        monkeypatch.setattr(datasets.CIFAR10, attr, entries)
    monkeypatch.setitem(datasets.CIFAR10.meta, "md5", sha_md5(folder / "batches.meta"))
    manifest = convert(tmp_path / "cifar", tmp_path / "shards", shard_size=100, workers=1)
    assert manifest["classes"] == [f"c{i}" for i in range(10)] and manifest["normalization"] == "cifar10"
    assert [manifest["splits"][s]["count"] for s in ("train", "val")] == [250, 20]
    source = datasets.CIFAR10(str(tmp_path / "cifar"), train=False)
    with tarfile.open(tmp_path / "shards" / manifest["splits"]["val"]["shards"][0]["name"]) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    for name, data in files.items():
        if name.endswith(".png"):
            index = int(name.split("_")[1].split(".")[0])  # keys are the source index: val_00000007
            pixels = np.asarray(Image.open(io.BytesIO(data)))
            assert np.array_equal(pixels, source.data[index])  # PNG: every pixel as it was
            assert int(files[name.replace(".png", ".cls")]) == source.targets[index]


def sha_md5(path):
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fashion_mnist_from_shared_data():
    spec = DataSpec(source="fashion-mnist", path=str(FASHION_MNIST), image_size=28, batch_size=100)
    readers = [open_data(prepare_data(spec), spec, 0, rank, 2) for rank in range(2)]
    assert readers[0].train_x.shape == (60000, 1, 28, 28) and readers[0].val_x.shape == (10000, 1, 28, 28)
    images, _ = next(readers[0].train_batches(0))  # grey as the model's 3 channels, each normalized alike
    assert images.shape == (100, 3, 28, 28) and torch.equal(images[:, 0], images[:, 2])
    pixels = (images[:, 0] * 0.3530 + 0.2860) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3) and pixels.min() >= -1e-3 and pixels.max() <= 255.001
    assert readers[0].steps_per_epoch(0) == 300
    seen = torch.cat([y for r in readers for _, y in r.val_batches()])
    assert len(seen) == 10000 and torch.equal(seen.bincount(), torch.full((10,), 1000))


def test_random_crop_flip_moves_pixels_only_within_padding():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    # Every output pixel comes from the same image and channel (reflect padding keeps values in range).
    for b in range(2):
        for c in range(3):
            assert set(out[b, c].flatten().tolist()) <= set(images[b, c].flatten().tolist())
