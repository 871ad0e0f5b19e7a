"""WebDataset tar shards: their names, the manifest that describes them, decoding and verification.

Each sample is `{__key__, jpg|png, cls}`. The manifest (`manifest.json` beside the shards) lists, per split, each
shard's name, sample count, byte size and sha256, and the class names in index order (a class's index is its
label). Its own hash is the data's identity for stage fingerprints. `pipeline.data.convert` writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import BinaryIO

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from webdataset.gopen import Pipe, gopen_schemes

from pipeline.spec import is_url
from pipeline.terminal import tracked

MANIFEST = "manifest.json"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def describe_shard(path: Path, count: int | None = None) -> dict:
    """A shard's manifest entry; `count` saves reading the tar again when the writer knows it."""
    count = count_samples(path) if count is None else count
    return {"name": path.name, "count": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


def decode_image(data: bytes) -> Image.Image:
    """JPEG or PNG bytes to an RGB PIL image (greyscale repeated to RGB); OSError if undecodable."""
    image = Image.open(io.BytesIO(data))
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() loads; RGB images load lazily


def decode_problem(err: OSError) -> str:
    """PIL's errors for bad image data are OSError subclasses; one that names no file object."""
    return "not an image PIL can identify" if isinstance(err, UnidentifiedImageError) else str(err)


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


def location_of(folder: str | Path, name: str) -> str:
    """A file of a shard folder, which is a local path or a URL."""
    folder = str(folder)
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else str(Path(folder) / name)


def open_location(url: str) -> BinaryIO:
    """Local paths open as files; http(s):// through curl, gs:// through gsutil (webdataset's own handlers) and
    s3:// through the aws CLI, each given as an argument list: no URL ever reaches a shell."""
    return wds.gopen(url)


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    if mode != "rb":
        raise ValueError(f"{url}: shards are only read")
    return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141, 23])


gopen_schemes.setdefault("s3", gopen_s3)


def manifest_bytes(folder: str | Path) -> bytes:
    with open_location(location_of(folder, MANIFEST)) as stream:
        return stream.read()


def read_manifest(folder: str | Path) -> dict:
    return json.loads(manifest_bytes(folder))


def manifest_id(folder: str | Path) -> str:
    return hashlib.sha256(manifest_bytes(folder)).hexdigest()


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
        for shard in tracked(split["shards"], "verifying shards"):
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
                if member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    try:
                        decode_image(tar.extractfile(member).read()).load()
                    except OSError as err:
                        return f"undecodable image {member.name} ({decode_problem(err)})"
    except (tarfile.TarError, OSError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if len(keys) != expected["count"]:
        return f"{len(keys)} samples, manifest says {expected['count']}"
    if sha256_file(path) != expected["sha256"]:
        return f"sha256 differs from the manifest ({path.stat().st_size} bytes, manifest says {expected['bytes']})"
    return None
