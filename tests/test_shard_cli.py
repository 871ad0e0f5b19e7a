"""`kdpipe data shard` and `kdpipe data verify` (issue 6, first step): real shards, real corruption."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.shards import MANIFEST, read_manifest
from pipeline.data.synthetic import write_image_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_image_folder(root / "images", classes=8, size=16, train_size=160, val_size=40, seed=3)
    assert main(["data", "shard", str(root / "images"), str(root / "out"), "--shard-size", "50"]) == 0
    return root / "out"


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "copy"))


def test_shard_then_verify_passes_and_counts_match_the_source(shards, capsys):
    manifest = read_manifest(shards)
    source = shards.parent / "images"
    for split in ("train", "val"):
        assert manifest["splits"][split]["count"] == sum(1 for p in (source / split).rglob("*.jpg"))
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [50, 50, 50, 10]
    capsys.readouterr()
    assert main(["data", "verify", str(shards)]) == 0
    assert "ok, 5 shards, 200 samples" in capsys.readouterr().out


def first_train_shard(folder: Path) -> Path:
    return folder / read_manifest(folder)["splits"]["train"]["shards"][0]["name"]


def truncate(folder: Path) -> str:
    shard = first_train_shard(folder)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return f"{shard}: truncated"


def undecodable_image(folder: Path) -> str:
    """Rewrite the shard with one JPEG's bytes garbled (same names, same count)."""
    shard = first_train_shard(folder)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    garbled = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == garbled:
                data = data[:20] + bytes(len(data) - 20)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return f"{shard}: unreadable"


def missing(folder: Path) -> str:
    shard = first_train_shard(folder)
    shard.unlink()
    return f"{shard}: missing"


def manifest_mismatch(folder: Path) -> str:
    manifest = read_manifest(folder)
    manifest["splits"]["train"]["shards"][0]["count"] = 49
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return f"{first_train_shard(folder)}: 50 samples, manifest says 49"


@pytest.mark.parametrize("damage", [truncate, undecodable_image, missing, manifest_mismatch])
def test_a_bad_shard_is_named_in_one_line_with_exit_2(copy, damage, capsys):
    expected = damage(copy)
    assert main(["data", "verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err


def test_shard_names_a_source_without_the_imagenet_layout(tmp_path, capsys):
    assert main(["data", "shard", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "expected a 'train' folder" in capsys.readouterr().err
