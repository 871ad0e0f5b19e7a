"""Data preparation on the driver: turn a job's `data` section into something every worker can open.

`prepare_data` runs once per job, before any stage: it generates and shards synthetic data when asked (cached by
its parameters), checks that real data is where the job says, and computes the data's identity, which enters
every stage fingerprint.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from kdpipe.errors import UserError
from kdpipe.job.spec import DataSpec, is_url

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}

SYNTHETIC_SHARDS = "shards"  # beside the generated "images" under `synthetic_root`

# torchvision's `FashionMNIST.classes`, without importing torchvision (seconds) to read them.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    kind: str  # shards | imagefolder | cifar | fashion-mnist: which reader opens it
    path: str  # absolute path, or the URL of a shard folder
    image_size: int
    num_classes: int
    normalization: str
    identity: str  # content identity: changes when the data changes, not when it moves
    train_count: int  # training samples (after `train_subset`)
    train_subset: int | None = None  # in-memory sources: only the first N training samples
    classes: tuple[str, ...] = ()  # the class names, in label order (CIFAR's: `class_names`)


def decodes_on_cuda(spec: DataSpec) -> bool:
    """Shards decoded and augmented on a CUDA device (`data.decode`): the same views as the loader workers', but by
    its own resizing kernels, which differ from the CPU's in the last bits."""
    import torch  # the driver asks too, and imports no torch for it otherwise

    return spec.source in ("shards", "synthetic") and spec.decode != "cpu" and torch.cuda.is_available()


def held_out_geometry(size: int) -> tuple[int | list[int], int]:
    """The held-out resize (shorter side, or both sides) and centre crop (`shard_reader.geometry`): what a served
    model repeats."""
    return (int(size / 0.875), size) if size > 64 else ([size, size], size)


def steps_per_epoch(prepared: PreparedData, batch_size: int, world: int) -> int:
    """Steps every rank takes in an epoch, worked out without reading an image: the driver checks a stage can
    train at all before it launches workers (a Ray Train restart would only fail again)."""
    return prepared.train_count // (batch_size * world)  # every reader deals out whole batches evenly


def prepare_data(spec: DataSpec) -> PreparedData:
    prepared = prepare_source(spec)
    if not spec.train_subset:
        return prepared
    identity = hashlib.sha256(f"{prepared.identity} first {spec.train_subset}".encode()).hexdigest()
    count = min(prepared.train_count, spec.train_subset)
    return dataclasses.replace(prepared, identity=identity, train_count=count, train_subset=spec.train_subset)


def prepare_source(spec: DataSpec) -> PreparedData:
    size = spec.image_size
    if spec.source in ("synthetic", "shards"):
        return prepare_shards(spec)
    path = Path(spec.path).resolve()
    if spec.source == "imagefolder":
        if not all((path / split).is_dir() for split in ("train", "val")):
            raise UserError(f"data.path: '{spec.path}' needs train/ and val/ class folders (ImageNet layout)")
        classes = sorted(c.name for c in (path / "train").iterdir() if c.is_dir())
        count = sum(1 for c in classes for f in (path / "train" / c).iterdir() if f.is_file())
        identity = folder_identity(path)
        return PreparedData(
            "imagefolder", str(path), size, len(classes), "imagenet", identity, count, classes=tuple(classes)
        )
    if spec.source == "cifar":  # torchvision's CIFAR format: always the full 50,000 training images
        folder = path / ("cifar-10-batches-py" if spec.classes == 10 else "cifar-100-python")
        if not folder.is_dir():
            raise UserError(f"data.path: '{spec.path}' has no {folder.name}/ (expected torchvision's CIFAR root)")
        identity = files_identity(sorted(f for f in folder.iterdir() if f.is_file()))
        cifar = f"cifar{spec.classes}"
        return PreparedData("cifar", str(path), size, spec.classes, cifar, identity, 50_000)
    identity = files_identity([fashion_mnist_file(path, name) for name in FASHION_MNIST_FILES])
    labels = fashion_mnist_file(path, FASHION_MNIST_FILES[1])
    with (gzip.open if labels.suffix == ".gz" else open)(labels, "rb") as f:
        count = int.from_bytes(f.read(8)[4:], "big")  # IDX header: magic number, then the item count
    names = FASHION_MNIST_CLASSES
    return PreparedData("fashion-mnist", str(path), size, 10, "fashion-mnist", identity, count, classes=names)


def class_names(prepared: PreparedData) -> tuple[str, ...]:
    """The class names in label order; CIFAR's are read (by torchvision, as its training does) only when asked."""
    if prepared.kind != "cifar":
        return prepared.classes
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if prepared.num_classes == 10 else CIFAR100
    return tuple(cls(prepared.path, train=False, download=False).classes)


def files_identity(files: list[Path]) -> str:
    """The bytes of a few files (CIFAR's batches, Fashion-MNIST's IDX files: tens of MB)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0".encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def folder_identity(root: Path) -> str:
    """Every file under `root` by relative path, size and modification time, in a fixed order: replacing one image
    changes it whatever the counts, and it reads no image (directory entries only; see the README for timings)."""
    lines, folders, prefix = [], [str(root)], len(str(root)) + 1
    while folders:
        with os.scandir(folders.pop()) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            elif entry.is_file():
                info = entry.stat()
                lines.append(f"{entry.path[prefix:]}\0{info.st_size}\0{info.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def prepare_shards(spec: DataSpec) -> PreparedData:
    from kdpipe.data.shards import manifest_bytes, parse_manifest

    if spec.source == "synthetic":
        location = str(synthesize(spec))
    else:
        location = spec.path if is_url(spec.path) else str(Path(spec.path).resolve())
    try:
        raw = manifest_bytes(location)
        manifest = parse_manifest(raw)
        classes, train_count = manifest["classes"], manifest["splits"]["train"]["count"]
    except Exception as err:  # a missing file, a failed download, bad JSON, a manifest of another shape
        raise UserError(
            f"data.path: '{location}' has no readable manifest.json (expected shards written by 'kdpipe data "
            f"shard'; {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    identity = hashlib.sha256(raw).hexdigest()
    normalization = manifest["normalization"]
    return PreparedData(
        "shards", location, spec.image_size, len(classes), normalization, identity, train_count, classes=tuple(classes)
    )


def data_identity(spec: DataSpec) -> str | None:
    """The data's identity without generating anything: None while synthetic data has not been made yet."""
    from kdpipe.data.shards import MANIFEST

    if spec.source == "synthetic" and not (synthetic_root(spec) / SYNTHETIC_SHARDS / MANIFEST).is_file():
        return None
    return prepare_data(spec).identity


def synthetic_root(spec: DataSpec) -> Path:
    """Where one set of generator parameters keeps its images and shards."""
    key = f"c{spec.classes}-s{spec.image_size}-n{spec.train_size}-{spec.val_size}-k{spec.shard_size}-seed{spec.seed}"
    return Path(spec.path or "data/synthetic").resolve() / key


def synthesize(spec: DataSpec) -> Path:
    """Generate (once) the synthetic ImageFolder and its shards; returns the shard folder."""
    from kdpipe.data.convert import convert
    from kdpipe.data.shards import MANIFEST
    from kdpipe.data.synthetic import write_image_folder

    root = synthetic_root(spec)
    shards = root / SYNTHETIC_SHARDS
    if (shards / MANIFEST).is_file():
        return shards
    # Build in a scratch folder and rename at the end: an interrupted run never leaves half a data set behind.
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=root.parent if root.parent.exists() else None))
    write_image_folder(scratch / "images", spec.classes, spec.image_size, spec.train_size, spec.val_size, spec.seed)
    convert(scratch / "images", scratch / SYNTHETIC_SHARDS, spec.shard_size, workers=1, normalization="synthetic")
    root.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(scratch, root)
    return shards


def fashion_mnist_file(path: Path, name: str) -> Path:
    for candidate in (path / f"{name}.gz", path / name, path / "FashionMNIST" / "raw" / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"data.path: '{path}' has no {name}[.gz] (expected the Fashion-MNIST IDX files)")


def uncompressed_fashion_mnist(path: Path) -> Path:
    """A root that torchvision's `FashionMNIST` reads: `root/FashionMNIST/raw/` with the IDX files uncompressed.

    The shipped copy is gzip-compressed and may be read-only, so the files are unpacked once into a cache folder;
    each is written to a temporary name and renamed, so workers unpacking at the same time never see half a file.
    """
    sources = [fashion_mnist_file(path, name) for name in FASHION_MNIST_FILES]
    key = hashlib.sha256("".join(f"{s}:{s.stat().st_size}" for s in sources).encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"kdpipe-fashion-mnist-{key}"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in zip(FASHION_MNIST_FILES, sources, strict=True):
        target = raw / name
        if target.is_file():
            continue
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as f, tempfile.NamedTemporaryFile(dir=raw, delete=False) as tmp:
            shutil.copyfileobj(f, tmp)
        os.replace(tmp.name, target)
    return root
