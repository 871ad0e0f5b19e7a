"""WebDataset tar shards: their names, the manifest that describes them, decoding and verification.

Each sample is `{__key__, jpg|png, cls}`. The manifest (`manifest.json` beside the shards) lists, per split, each
shard's name, sample count, byte size and sha256, and the class names in index order (a class's index is its
label). Its own hash is the data's identity for stage fingerprints. `kdpipe.data.convert` writes them.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import torch
import webdataset as wds
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from webdataset.gopen import Pipe, gopen_schemes

from kdpipe.data import NORMALIZATION
from kdpipe.job.describe import describe_error
from kdpipe.job.spec import is_url
from kdpipe.terminal import tracked

MANIFEST = "manifest.json"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def describe_shard(path: Path, count: int | None = None) -> dict:
    """A shard's manifest entry; `count` saves reading the tar again when the writer knows it."""
    count = count_samples(path) if count is None else count
    return {"name": path.name, "count": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which needs FFmpeg on every node; they
# stay the fastest CPU path here and the GPU image's torchvision (0.26) has them undeprecated.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
MAX_PIXELS = 1 << 27  # 134 M pixels (a 11,585 px square): far above any photo data set, far below a decompression bomb


class BadImage(OSError):
    """Image bytes that do not decode, or that would decode to more than MAX_PIXELS."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; an image claiming billions of pixels, or none, is refused."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError:
        raise BadImage(f"more pixels than the {MAX_PIXELS} allowed (a decompression bomb?)") from None
    except (OSError, ValueError) as err:
        raise BadImage(f"not an image PIL can identify ({type(err).__name__})") from None
    if width * height > MAX_PIXELS:
        raise BadImage(f"{width} x {height} pixels, more than the {MAX_PIXELS} allowed")
    return width, height


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG or PNG bytes as a uint8 3 x H x W RGB tensor (greyscale repeated to RGB), by torchvision's decoders
    (libjpeg-turbo, libpng: faster than PIL's, `bench/data.py`). The size is read from the header first,
    so an image claiming billions of pixels is refused before anything is allocated."""
    image_size(data)
    # Imported here: torchvision pulls torch._dynamo (seconds), and the driver reads manifests but no images.
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as torchvision_decode

    try:
        return torchvision_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise BadImage(str(err).strip().splitlines()[0][:200]) from None


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


MAX_MANIFEST_BYTES = 64 << 20  # ImageNet's is about 200 KB


class ShardEntry(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.tar$", max_length=255)  # a file beside the manifest
    count: int = Field(ge=0, le=10_000_000)
    bytes: int = Field(ge=0, le=1 << 42)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Split(BaseModel):
    count: int = Field(ge=0, le=10_000_000_000)
    shards: list[ShardEntry] = Field(max_length=1_000_000)

    @model_validator(mode="after")
    def _counts_add_up(self) -> Split:
        if self.count != sum(shard.count for shard in self.shards):
            raise ValueError(f"count: {self.count} is not the sum of its shards' counts")
        return self


class Manifest(BaseModel):
    """What `kdpipe data shard` writes; anything else in a manifest is refused before a reader trusts it."""

    model_config = ConfigDict(allow_inf_nan=False)
    classes: list[str] = Field(min_length=2, max_length=100_000)
    normalization: Literal[tuple(NORMALIZATION)] = "imagenet"  # type: ignore[valid-type]
    format: str | None = Field(None, max_length=100)
    splits: dict[Literal["train", "val"], Split] = Field(min_length=2)


def manifest_bytes(folder: str | Path) -> bytes:
    with open_location(location_of(folder, MANIFEST)) as stream:
        data = stream.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{MANIFEST}: over {MAX_MANIFEST_BYTES} bytes")
    return data


def parse_manifest(data: bytes) -> dict:
    """A manifest's bytes, checked against `Manifest`; ValueError with one line naming the field if they lie."""
    try:
        return Manifest.model_validate_json(data).model_dump()
    except ValidationError as err:
        raise ValueError(f"{MANIFEST}: {describe_error(err, Manifest)}") from None


def read_manifest(folder: str | Path) -> dict:
    return parse_manifest(manifest_bytes(folder))


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
                        decode_image(tar.extractfile(member).read())
                    except BadImage as err:
                        return f"undecodable image {member.name} ({err})"
    except (tarfile.TarError, OSError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if len(keys) != expected["count"]:
        return f"{len(keys)} samples, manifest says {expected['count']}"
    if sha256_file(path) != expected["sha256"]:
        return f"sha256 differs from the manifest ({path.stat().st_size} bytes, manifest says {expected['bytes']})"
    return None
