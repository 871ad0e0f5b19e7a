"""Real damage to real shards, each returning what the one-line report about it must contain."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from kdpipe.data.shards import MANIFEST, read_manifest


def train_shard(folder: Path, index: int = 0) -> Path:
    return folder / read_manifest(folder)["splits"]["train"]["shards"][index]["name"]


def truncate(folder: Path) -> str:
    shard = train_shard(folder)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return f"{shard}: truncated"


def garble_image(shard: Path, which: int = 0) -> str:
    """Rewrite the shard with the `which`-th image's bytes garbled (same names, same count); returns its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    garbled = [m.name for m, _ in members if m.name.endswith((".jpg", ".png"))][which]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == garbled:
                data = data[:20] + bytes(len(data) - 20)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return garbled.split(".")[0]


def undecodable_image(folder: Path) -> str:
    shard = train_shard(folder)
    key = garble_image(shard)
    return f"{shard}: undecodable image {key}"


def missing(folder: Path) -> str:
    shard = train_shard(folder)
    shard.unlink()
    return f"{shard}: missing"


def manifest_mismatch(folder: Path) -> str:
    manifest = read_manifest(folder)
    entry = manifest["splits"]["train"]["shards"][0]
    entry["count"] -= 1
    manifest["splits"]["train"]["count"] -= 1  # a consistent manifest: only the tar tells the truth
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return f"{train_shard(folder)}: {entry['count'] + 1} samples, manifest says {entry['count']}"


DAMAGES = [truncate, undecodable_image, missing, manifest_mismatch]
