"""WebDataset tar shards: writing them from an ImageFolder tree, and the manifest that describes them.

Each sample is `{__key__, jpg, cls}`; JPEG bytes are stored as read from disk, never re-encoded. The manifest
(`manifest.json` beside the shards) lists, per split, each shard's name, sample count, byte size and sha256, and
the class names in index order. Its own hash is the data's identity for stage fingerprints.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image
from rich.progress import track

MANIFEST = "manifest.json"


def shard_image_folder(
    src: Path,
    out: Path,
    shard_size: int,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
    normalization: str = "imagenet",
) -> dict:
    """Write `out/{split}-NNNNNN.tar` for each split folder of `src` and the manifest; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in (src / splits[0]).iterdir() if p.is_dir())
    manifest: dict = {"classes": classes, "normalization": normalization, "splits": {}}
    for split in splits:
        files = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((src / split / name).iterdir())
            if path.is_file()
        ]
        # Written in a fixed random order: a reader's shuffle buffer only mixes nearby samples, so shards in
        # class order would feed whole runs of one class into consecutive batches.
        random.Random(seed).shuffle(files)
        # maxsize far above maxcount * image size: shards split by count alone, so sizes are predictable.
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, maxsize=1 << 40, verbose=0) as sink:
            for i, (path, label) in enumerate(track(files, description=f"sharding {split}", transient=True)):
                sink.write({"__key__": f"{split}_{i:08d}", "jpg": path.read_bytes(), "cls": label})
        manifest["splits"][split] = describe_shards(sorted(out.glob(f"{split}-*.tar")))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def describe_shards(paths: list[Path]) -> dict:
    shards = [
        {"name": p.name, "count": count_samples(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths
    ]
    return {"count": sum(s["count"] for s in shards), "shards": shards}


def sample_key(member: tarfile.TarInfo) -> str:
    """WebDataset's grouping: the files of one sample share the name up to the first dot."""
    return member.name.split(".", 1)[0]


def count_samples(path: Path) -> int:
    with tarfile.open(path) as tar:
        return len({sample_key(member) for member in tar})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def manifest_id(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def verify_shards(folder: Path) -> list[str]:
    """Every problem with a shard folder, one line each naming the file: a missing or unreadable manifest, a
    missing shard, a hash or sample-count mismatch, a truncated tar, an image that does not decode."""
    try:
        manifest = read_manifest(folder)
        splits = manifest["splits"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{folder / MANIFEST}: not a readable shard manifest ({type(err).__name__}: {err})"]
    problems = []
    for split in splits.values():
        for shard in track(split["shards"], description="verifying shards", transient=True):
            path = folder / shard["name"]
            problem = shard_problem(path, shard)
            if problem:
                problems.append(f"{path}: {problem}")
    return problems


def shard_problem(path: Path, expected: dict) -> str | None:
    """The most telling problem first: missing, truncated, unreadable, then counts, then the hash."""
    if not path.is_file():
        return "missing (listed in the manifest)"
    if path.stat().st_size < expected["bytes"]:
        return f"truncated: {path.stat().st_size} bytes, manifest says {expected['bytes']}"
    try:
        with tarfile.open(path) as tar:
            keys = set()
            for member in tar:
                keys.add(sample_key(member))
                if member.name.endswith((".jpg", ".jpeg", ".png")):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                        image.load()
    except (tarfile.TarError, OSError) as err:  # PIL raises OSError subclasses for bad image data
        return f"unreadable ({type(err).__name__}: {err})"
    if len(keys) != expected["count"]:
        return f"{len(keys)} samples, manifest says {expected['count']}"
    if sha256_file(path) != expected["sha256"]:
        return f"sha256 differs from the manifest ({path.stat().st_size} bytes, manifest says {expected['bytes']})"
    return None
