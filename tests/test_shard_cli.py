"""`kdpipe data shard` and `kdpipe data verify`: real JPEGs, parallel writer processes, real corruption."""

from __future__ import annotations

import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from kdpipe.cli import main
from kdpipe.data.shards import read_manifest
from tests.conftest import SHARD_ARGS
from tests.shard_damage import DAMAGES, train_shard


@pytest.fixture(scope="module")
def shards(jpeg_shards) -> Path:
    return jpeg_shards


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "copy"))


def shard_contents(folder: Path, split: str) -> tuple[Counter, set[bytes]]:
    """Samples per label, and the image bytes, read back from the split's tar files."""
    labels, images = Counter(), set()
    for shard in read_manifest(folder)["splits"][split]["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".cls"):
                    labels[int(data)] += 1
                else:
                    images.add(data)
    return labels, images


def test_shard_then_verify_passes_and_counts_match_the_source_exactly(shards, capsys):
    manifest = read_manifest(shards)
    source = shards.parent / "images"
    assert manifest["classes"] == [f"class_{i:02d}" for i in range(8)]
    for split in ("train", "val"):
        folders = sorted((source / split).iterdir())
        per_class = {i: len(list(folder.glob("*.jpg"))) for i, folder in enumerate(folders)}
        labels, images = shard_contents(shards, split)
        assert manifest["splits"][split]["count"] == sum(per_class.values()) == sum(labels.values())
        assert labels == per_class  # each class index holds exactly its folder's images
        assert images == {p.read_bytes() for p in (source / split).rglob("*.jpg")}  # JPEG bytes as they were
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [300] * 6 + [248]
    capsys.readouterr()
    assert main(["data", "verify", str(shards)]) == 0
    assert "ok, 9 shards, 2400 samples" in capsys.readouterr().out


def test_an_interrupted_conversion_reruns_to_the_same_shards(shards, copy):
    """What an interrupted run leaves: some shards written, one half-written in its scratch folder, no manifest."""
    for name in ("manifest.json", "train-000002.tar", "train-000005.tar", "val-000000.tar"):
        (copy / name).unlink()
    scratch = copy / ".partial-train-000002-abc"
    scratch.mkdir()
    (scratch / "train-000002.tar").write_bytes((shards / "train-000002.tar").read_bytes()[:5000])
    assert main(["data", "shard", str(shards.parent / "images"), str(copy), *SHARD_ARGS]) == 0
    assert read_manifest(copy) == read_manifest(shards)  # same shards, byte for byte (their sha256)
    assert not list(copy.glob(".partial-*"))
    assert main(["data", "verify", str(copy)]) == 0


def test_a_rerun_with_other_settings_is_refused(shards, copy, capsys):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert main(["data", "shard", str(shards.parent / "images"), str(copy), "--shard-size", "100"]) == 2
    assert "holds shards of a different conversion" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # nothing written or deleted


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_bad_shard_is_named_in_one_line_with_exit_2(copy, damage, capsys):
    expected = damage(copy)
    assert main(["data", "verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err


def test_shard_names_a_source_it_cannot_read(tmp_path, capsys):
    assert main(["data", "shard", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}: not a data set I can shard" in err[0]


def test_shard_refuses_a_folder_of_foreign_tar_files(shards, tmp_path, capsys):
    (tmp_path / "other.tar").write_bytes(train_shard(shards).read_bytes())
    assert main(["data", "shard", str(shards.parent / "images"), str(tmp_path), *SHARD_ARGS]) == 2
    assert "already holds tar files" in capsys.readouterr().err
