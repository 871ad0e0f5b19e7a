"""Converting a data set into WebDataset tar shards, in parallel processes, resumable.

Sources: an ImageFolder tree (ImageNet layout: `train/` and `val/` class folders), torchvision's CIFAR-10/100
folders, or the Fashion-MNIST IDX files (both through torchvision's dataset classes). JPEG and PNG files are stored
as they are; pixel arrays (CIFAR, Fashion-MNIST) are stored as lossless PNG.

The conversion is planned before anything is written: each split's samples in a fixed shuffled order, cut into
shards of `shard_size`. Every shard is written by one task into a scratch folder and renamed into place when whole,
so a rerun after an interruption writes exactly the shards that are missing, and never a sample twice.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import webdataset as wds

from kdpipe.data import fashion_mnist_file, uncompressed_fashion_mnist
from kdpipe.data.shards import MANIFEST, describe_shard, shard_name
from kdpipe.errors import UserError
from kdpipe.terminal import progress_bar

PLAN = ".conversion.json"  # what a rerun must match to continue an interrupted conversion
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Source:
    format: str  # imagefolder | cifar10 | cifar100 | fashion-mnist
    root: str  # absolute
    classes: list[str]
    normalization: str
    sizes: dict[str, int]  # samples per split


def open_source(src: Path) -> Source:
    """Recognise the source format from the folder's contents; a one-line error when it is none of them."""
    root = src.resolve()
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-100-python").is_dir():
        fmt = "cifar10" if (root / "cifar-10-batches-py").is_dir() else "cifar100"
    elif any((root / f"train-labels-idx1-ubyte{ext}").is_file() for ext in ("", ".gz")):
        fmt = "fashion-mnist"
    elif all((root / split).is_dir() for split in SPLITS):
        fmt = "imagefolder"
    else:
        raise UserError(
            f"{src}: not a data set I can shard; expected train/ and val/ class folders (ImageFolder), "
            "cifar-10-batches-py/ or cifar-100-python/ (torchvision CIFAR), or Fashion-MNIST IDX files"
        )
    if fmt == "imagefolder":
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        sizes = {split: len(folder_samples(str(root), split, tuple(classes))) for split in SPLITS}
        return Source(fmt, str(root), classes, "imagenet", sizes)
    splits = {split: torchvision_split(fmt, str(root), split) for split in SPLITS}
    sizes = {split: len(data) for split, data in splits.items()}
    return Source(fmt, str(root), list(splits["train"].classes), fmt, sizes)


@cache
def folder_samples(root: str, split: str, classes: tuple[str, ...]) -> list[tuple[str, int]]:
    """(file, label) of every image of an ImageFolder split, in class then file-name order."""
    return [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((Path(root) / split / name).iterdir())
        if path.is_file()
    ]


@cache
def torchvision_split(fmt: str, root: str, split: str):
    """torchvision's own dataset class for the split, loaded once per process."""
    from torchvision import datasets

    train = split == "train"
    if fmt == "fashion-mnist":
        fashion_mnist_file(Path(root), "train-labels-idx1-ubyte")  # a one-line error when files are missing
        return datasets.FashionMNIST(str(uncompressed_fashion_mnist(Path(root))), train=train, download=False)
    cls = datasets.CIFAR10 if fmt == "cifar10" else datasets.CIFAR100
    try:
        return cls(root, train=train, download=False)
    except RuntimeError as err:  # torchvision's checksum check of the release files
        raise UserError(f"{root}: {cls.__name__} files did not load ({err})") from None


def sample_record(source: Source, split: str, index: int) -> tuple[str, bytes, int]:
    """(extension, image bytes, label) of one sample: files as they are, pixel arrays as PNG."""
    if source.format == "imagefolder":
        path, label = folder_samples(source.root, split, tuple(source.classes))[index]
        suffix = Path(path).suffix.lower().lstrip(".")
        return ("jpg" if suffix == "jpeg" else suffix), Path(path).read_bytes(), label
    image, label = torchvision_split(source.format, source.root, split)[index]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue(), int(label)


def write_shard(source: Source, split: str, number: int, indices: list[int], out: Path) -> dict:
    """Write one shard via a scratch folder and rename it into place; returns its manifest entry."""
    scratch = Path(tempfile.mkdtemp(prefix=f".partial-{split}-{number:06d}-", dir=out))
    pattern = str(scratch / f"{split}-%06d.tar")
    # mtime 0: byte-identical shards on every run, and no per-file PAX header for a float mtime (half the size
    # of a small image's sample).
    settings = {"maxcount": len(indices), "maxsize": 1 << 40, "start_shard": number, "verbose": 0, "mtime": 0}
    with wds.ShardWriter(pattern, **settings) as sink:
        for position in indices:
            ext, data, label = sample_record(source, split, position)
            sink.write({"__key__": sample_id(split, position), ext: data, "cls": label})
    final = out / shard_name(split, number)
    os.replace(scratch / final.name, final)
    shutil.rmtree(scratch)
    return describe_shard(final, len(indices))


def sample_id(split: str, position: int) -> str:
    return f"{split}_{position:08d}"


def shard_plan(source: Source, shard_size: int, seed: int) -> dict[str, list[list[int]]]:
    """Per split, the source indices of each shard. Written in a fixed random order: a reader's shuffle buffer
    only mixes nearby samples, so shards in class order would feed runs of one class into consecutive batches."""
    plan = {}
    for split in SPLITS:
        order = list(range(source.sizes[split]))
        random.Random(seed).shuffle(order)
        plan[split] = [order[i : i + shard_size] for i in range(0, len(order), shard_size)]
    return plan


def convert(
    src: Path, out: Path, shard_size: int, workers: int, seed: int = 0, normalization: str | None = None
) -> dict:
    """Shard `src` into `out` with `workers` processes (1: in this process); returns the manifest.

    `normalization` names the per-channel statistics readers apply (default: the source format's own)."""
    source = open_source(src)
    # Where the source lives is left out: a conversion moved along with its source continues.
    settings = {"source": {**asdict(source), "root": None}, "shard_size": shard_size, "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / PLAN
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise UserError(f"{out}: holds shards of a different conversion ({recorded.name} differs); use an empty folder")
    if not recorded.is_file():
        if any(out.glob("*.tar")):
            raise UserError(f"{out}: already holds tar files not written by 'kdpipe data shard'; use an empty folder")
        recorded.write_text(json.dumps(settings, indent=1))
    for leftover in out.glob(".partial-*"):  # half-written shards of an interrupted run
        shutil.rmtree(leftover)

    plan = shard_plan(source, shard_size, seed)
    entries: dict[str, dict[int, dict]] = {split: {} for split in SPLITS}
    todo = []
    for split, shards in plan.items():
        for number, indices in enumerate(shards):
            if (out / shard_name(split, number)).is_file():
                entries[split][number] = describe_shard(out / shard_name(split, number))
            else:
                todo.append((split, number, indices))
    with progress_bar() as progress:
        bar = progress.add_task("sharding", total=sum(source.sizes.values()))
        progress.advance(bar, sum(e["count"] for split in entries.values() for e in split.values()))
        if workers <= 1:
            for split, number, indices in todo:
                entries[split][number] = write_shard(source, split, number, indices, out)
                progress.advance(bar, len(indices))
        else:
            # Forked: the children start with torch and the source already loaded (a fresh interpreter would spend
            # seconds importing). Only the command line forks; a job's driver converts with workers=1.
            fork = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=fork) as pool:
                futures = {pool.submit(write_shard, source, *task, out): task for task in todo}
                for future in as_completed(futures):
                    split, number, indices = futures[future]
                    entries[split][number] = future.result()
                    progress.advance(bar, len(indices))
    manifest = {
        "classes": source.classes,
        "normalization": normalization or source.normalization,
        "format": source.format,
        "splits": {
            split: {
                "count": sum(e["count"] for e in entries[split].values()),
                "shards": [entries[split][n] for n in sorted(entries[split])],
            }
            for split in SPLITS
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
