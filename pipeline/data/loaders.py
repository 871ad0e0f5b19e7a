"""What a training worker reads: per-rank training batches (the same count on every rank) and evaluation batches
that cover each held-out sample exactly once across ranks.

Three readers behind one interface:
- `ShardData`: WebDataset tar shards, split by node (rank) and by DataLoader worker;
- `TensorData`: data sets small enough to hold as one uint8 tensor (CIFAR, Fashion-MNIST), batched and augmented
  on the tensor itself, with no per-sample Python work;
- `FolderData`: a torchvision ImageFolder tree (ImageNet layout) through a DataLoader.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

from pipeline.data import NORMALIZATION, PreparedData, uncompressed_fashion_mnist
from pipeline.data.shards import read_manifest
from pipeline.spec import DataSpec

Batch = tuple[torch.Tensor, torch.Tensor]
SHUFFLE_BUFFER = 1000  # samples each DataLoader worker shuffles among, after the per-epoch shard shuffle


class StageData(Protocol):
    """Each epoch's batches are a function of (seed, epoch, rank): resuming at step k of an epoch replays the same
    order and starts at batch k, so no sample is trained twice or skipped."""

    num_classes: int

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...

    def steps_per_epoch(self, epoch: int) -> int: ...

    def val_batches(self) -> Iterator[Batch]: ...


def open_data(prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int) -> StageData:
    """This rank's reader of the prepared data, with the job's batch size, loader workers and augmentation."""
    reader = {"shards": ShardData, "imagefolder": FolderData}.get(prepared.kind, TensorData)
    return reader(prepared, spec, seed, rank, world)


def first_epoch_steps(prepared: PreparedData, spec: DataSpec, seed: int, world: int) -> int:
    """Steps every rank takes in epoch 0, worked out without reading an image: the driver checks a stage can
    train at all before it launches workers (a Ray Train restart would only fail again)."""
    if prepared.kind == "shards":
        return ShardData(prepared, spec, seed, 0, world).steps_per_epoch(0)
    return prepared.train_count // world // spec.batch_size  # TensorData and FolderData deal samples out evenly


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's shuffle (rank 0: the shard order all ranks share) or of one rank's sample order and
    augmentation; different for every (job seed, epoch, rank)."""
    return (seed * 100003 + epoch) * 1009 + rank


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the DataLoader's workers, and so their augmentation, the same way whenever the epoch is replayed."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))


def image_transforms(size: int, mean: tuple, std: tuple, train: bool) -> v2.Compose:
    """ImageNet recipe (RandomResizedCrop + flip; resize + centre crop) above 64 px, CIFAR recipe below it."""
    if size > 64:
        geometry = (
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(int(size / 0.875), antialias=True), v2.CenterCrop(size)]
        )
    else:
        geometry = [v2.Resize((size, size), antialias=True)]
        if train:
            geometry += [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()]
    return v2.Compose(
        [v2.ToImage(), v2.RGB(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )


class ShardData:
    def __init__(self, prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int):
        manifest = read_manifest(prepared.path)
        self.num_classes = len(manifest["classes"])
        self.folder, self.batch_size, self.workers = prepared.path, spec.batch_size, spec.loader_workers
        self.seed, self.rank, self.world = seed, rank, world
        self.train_shards = {s["name"]: s["count"] for s in manifest["splits"]["train"]["shards"]}
        self.val_shards = [s["name"] for s in manifest["splits"]["val"]["shards"]]
        mean, std = NORMALIZATION[prepared.normalization]
        self.train_tf = image_transforms(prepared.image_size, mean, std, train=spec.augment)
        self.val_tf = image_transforms(prepared.image_size, mean, std, train=False)

    def _epoch_shards(self, epoch: int) -> list[str]:
        """All ranks shuffle the shard list identically, then `split_by_node` deals it out."""
        names = sorted(self.train_shards)
        random.Random(epoch_seed(self.seed, epoch)).shuffle(names)
        return names

    def steps_per_epoch(self, epoch: int) -> int:
        """Full batches the poorest rank can make: every rank stops there, so collectives never wait forever."""
        names = self._epoch_shards(epoch)
        workers = max(self.workers, 1)

        def rank_batches(rank: int) -> int:
            mine = names[rank :: self.world]
            return sum(sum(self.train_shards[n] for n in mine[w::workers]) // self.batch_size for w in range(workers))

        return min(rank_batches(r) for r in range(self.world))

    def _pipeline(
        self, names: list[str], transform: v2.Compose, shuffle_seed: int | None, partial: bool
    ) -> wds.WebDataset:
        urls = [str(self.folder / n) for n in names]
        dataset = wds.WebDataset(
            urls,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            shardshuffle=False,
            empty_check=False,
        )
        if shuffle_seed is not None:
            dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed)
        return (
            dataset.decode("pil")
            .to_tuple("jpg;png", "cls")
            .map_tuple(transform, int)
            .batched(self.batch_size, partial=partial)
        )

    def _loader(self, dataset: wds.WebDataset, generator: torch.Generator | None = None) -> wds.WebLoader:
        return wds.WebLoader(dataset, batch_size=None, num_workers=self.workers, generator=generator)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        seed = epoch_seed(self.seed, epoch, self.rank)
        dataset = self._pipeline(self._epoch_shards(epoch), self.train_tf, seed, partial=False)
        loader = self._loader(dataset, loader_generator(self.seed, epoch, self.rank))
        # Resuming mid-epoch reads the first `start` batches again (same order, same augmentation) but trains none.
        return itertools.islice(loader.with_epoch(self.steps_per_epoch(epoch)), start, None)

    def val_batches(self) -> Iterator[Batch]:
        return iter(self._loader(self._pipeline(self.val_shards, self.val_tf, None, partial=True)))


class TensorData:
    """The whole split as one uint8 N x 3 x H x W tensor: sampling, cropping and flipping are tensor ops."""

    def __init__(self, prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int):
        self.train_x, self.train_y, self.val_x, self.val_y, self.num_classes = load_tensors(prepared)
        self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[prepared.normalization])
        self.size, self.batch_size, self.augment = prepared.image_size, spec.batch_size, spec.augment
        self.seed, self.rank, self.world = seed, rank, world

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.train_y) // self.world // self.batch_size

    def _float(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().div_(255)
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        return (images - self.mean) / self.std

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        order = order[self.rank :: self.world]
        for step in range(start, self.steps_per_epoch(epoch)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            images = self._float(self.train_x[index])
            if self.augment:  # seeded per step: a resumed epoch augments its remaining batches as the first pass did
                step_seed = epoch_seed(self.seed, epoch, self.rank) * 100_000 + step
                images = random_crop_flip(images, self.size // 8, torch.Generator().manual_seed(step_seed))
            yield images, self.train_y[index]

    def val_batches(self) -> Iterator[Batch]:
        index = torch.arange(self.rank, len(self.val_y), self.world)
        for chunk in index.split(self.batch_size):
            yield self._float(self.val_x[chunk]), self.val_y[chunk]


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop from a reflect-padded batch and random horizontal flip, as batched gathers."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * padding + 1, (batch,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    crops = padded.gather(2, rows.expand(-1, padded.shape[1], -1, padded.shape[3]))
    crops = crops.gather(3, cols.expand(-1, crops.shape[1], height, -1))
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def load_tensors(prepared: PreparedData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """CIFAR or Fashion-MNIST through torchvision's own dataset classes, as uint8 N x 3 x H x W tensors."""
    if prepared.kind == "cifar":
        cls = datasets.CIFAR10 if prepared.num_classes == 10 else datasets.CIFAR100
        splits = [cls(str(prepared.path), train=t, download=False) for t in (True, False)]
        as_tensor = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in splits]
    else:
        root = uncompressed_fashion_mnist(prepared.path)
        splits = [datasets.FashionMNIST(str(root), train=t, download=False) for t in (True, False)]
        as_tensor = [s.data[:, None].expand(-1, 3, -1, -1).contiguous() for s in splits]
    labels = [torch.as_tensor(s.targets, dtype=torch.long) for s in splits]
    return as_tensor[0], labels[0], as_tensor[1], labels[1], len(splits[0].classes)


class FolderData:
    """ImageNet layout: `path/train/<class>/*.jpg` and `path/val/<class>/*.jpg`."""

    def __init__(self, prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int):
        mean, std = NORMALIZATION[prepared.normalization]
        root = Path(prepared.path)
        self.train = datasets.ImageFolder(
            str(root / "train"), image_transforms(prepared.image_size, mean, std, spec.augment)
        )
        val = datasets.ImageFolder(str(root / "val"), image_transforms(prepared.image_size, mean, std, False))
        self.val = Subset(val, range(rank, len(val), world))  # each held-out image on exactly one rank
        self.num_classes = len(self.train.classes)
        self.sampler = DistributedSampler(self.train, world, rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.workers, self.seed, self.rank = spec.batch_size, spec.loader_workers, seed, rank

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.sampler) // self.batch_size

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        loader = DataLoader(
            self.train,
            self.batch_size,
            sampler=self.sampler,
            num_workers=self.workers,
            drop_last=True,
            generator=loader_generator(self.seed, epoch, self.rank),
        )
        return itertools.islice(loader, start, None)  # as for shards: a resumed epoch replays its first batches

    def val_batches(self) -> Iterator[Batch]:
        return iter(DataLoader(self.val, self.batch_size, num_workers=self.workers))
