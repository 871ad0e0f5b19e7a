"""What a training worker reads: per-rank training batches (the same count on every rank) and evaluation batches
that cover each held-out sample exactly once across ranks.

Three readers behind one interface:
- `ShardData` (in `shard_reader`): WebDataset tar shards, one contiguous range of samples per rank and DataLoader
  worker;
- `TensorData`: data sets small enough to hold as one uint8 tensor (CIFAR, Fashion-MNIST), batched and augmented
  on the tensor itself, with no per-sample Python work;
- `FolderData`: a torchvision ImageFolder tree (ImageNet layout) through a DataLoader.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

from kdpipe.data import NORMALIZATION, PreparedData, uncompressed_fashion_mnist
from kdpipe.data.order import LOADER_CONTEXT, epoch_seed, loader_generator, own_random_stream
from kdpipe.data.shard_reader import ShardData, geometry, to_device
from kdpipe.data.shards import decode_image
from kdpipe.job.spec import DataSpec

Batch = tuple[torch.Tensor, torch.Tensor]


class StageData(Protocol):
    """Each epoch's batches are a function of (seed, epoch, rank): resuming at step k of an epoch replays the same
    order and starts at batch k, so no sample is trained twice or skipped. A batch's images become the model's input
    through `inputs`, on the device where the model runs (the shard reader hands over uint8 pixels)."""

    num_classes: int
    skipped: int  # bad samples skipped in the current epoch (only shards can have them)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...

    def steps_per_epoch(self, epoch: int) -> int: ...

    def val_batches(self) -> Iterator[Batch]: ...

    def inputs(self, images: torch.Tensor, device: torch.device) -> torch.Tensor: ...


def open_data(
    prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int, pin_memory: bool = False
) -> StageData:
    """This rank's reader of the prepared data, with the job's batch size, loader workers and augmentation.
    `pin_memory` (for a GPU) has the loader workers' batches copied to page-locked memory: a copy from there to the
    GPU runs beside the step, where one from ordinary memory first waits for every queued kernel."""
    reader = {"shards": ShardData, "imagefolder": FolderData}.get(prepared.kind, TensorData)
    return reader(prepared, spec, seed, rank, world, pin_memory)


def image_transforms(size: int, mean: tuple, std: tuple, train: bool) -> v2.Compose:
    """A uint8 RGB image tensor to a normalized float tensor, with the shard reader's geometry."""
    return v2.Compose([geometry(size, train), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def read_rgb(path: str) -> torch.Tensor:
    """An image file as a uint8 RGB tensor, by the shard reader's decoder (ImageFolder's loader)."""
    return decode_image(Path(path).read_bytes())


class TensorData:
    """The whole split as one uint8 N x C x H x W tensor: sampling, cropping and flipping are tensor ops."""

    skipped = 0
    inputs = staticmethod(to_device)

    def __init__(self, prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int, pin_memory: bool):
        self.train_x, self.train_y, self.val_x, self.val_y, self.num_classes = load_tensors(prepared)
        if prepared.train_subset:
            self.train_x, self.train_y = self.train_x[: prepared.train_subset], self.train_y[: prepared.train_subset]
        self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[prepared.normalization])
        self.size, self.batch_size, self.augment = prepared.image_size, spec.batch_size, spec.augment
        self.seed, self.rank, self.world = seed, rank, world

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.train_y) // self.world // self.batch_size

    def _float(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized float N x 3 x size x size: one grey channel is broadcast to three by the normalization."""
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
    """CIFAR or Fashion-MNIST through torchvision's own dataset classes, as uint8 N x C x H x W tensors: 3 channels
    for CIFAR, 1 for Fashion-MNIST (its grey becomes the model's 3 channels per batch, as it is normalized, rather than
    a 3-channel copy of the whole set in every rank)."""
    if prepared.kind == "cifar":
        cls = datasets.CIFAR10 if prepared.num_classes == 10 else datasets.CIFAR100
        splits = [cls(str(prepared.path), train=t, download=False) for t in (True, False)]
        as_tensor = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in splits]
    else:
        root = uncompressed_fashion_mnist(Path(prepared.path))
        splits = [datasets.FashionMNIST(str(root), train=t, download=False) for t in (True, False)]
        as_tensor = [s.data[:, None] for s in splits]
    labels = [torch.as_tensor(s.targets, dtype=torch.long) for s in splits]
    return as_tensor[0], labels[0], as_tensor[1], labels[1], len(splits[0].classes)


class FolderData:
    """ImageNet layout: `path/train/<class>/*.jpg` and `path/val/<class>/*.jpg`."""

    skipped = 0
    inputs = staticmethod(to_device)

    def __init__(self, prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int, pin_memory: bool):
        mean, std = NORMALIZATION[prepared.normalization]
        root = Path(prepared.path)
        self.train = datasets.ImageFolder(
            str(root / "train"), image_transforms(prepared.image_size, mean, std, spec.augment), loader=read_rgb
        )
        val = datasets.ImageFolder(
            str(root / "val"), image_transforms(prepared.image_size, mean, std, False), loader=read_rgb
        )
        self.val = Subset(val, range(rank, len(val), world))  # each held-out image on exactly one rank
        self.num_classes = len(self.train.classes)
        self.sampler = DistributedSampler(self.train, world, rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.workers, self.seed, self.rank = spec.batch_size, spec.loader_workers, seed, rank
        self.pin_memory = pin_memory

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.sampler) // self.batch_size

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        generator = loader_generator(self.seed, epoch, self.rank)
        loader = DataLoader(
            self.train,
            self.batch_size,
            sampler=self.sampler,
            num_workers=self.workers,
            multiprocessing_context=LOADER_CONTEXT if self.workers else None,
            drop_last=True,
            generator=generator,
            pin_memory=self.pin_memory,
        )
        batches = loader if self.workers else own_random_stream(loader, generator)
        return itertools.islice(batches, start, None)  # as for shards: a resumed epoch replays its first batches

    def val_batches(self) -> Iterator[Batch]:
        context = LOADER_CONTEXT if self.workers else None
        options = {"num_workers": self.workers, "multiprocessing_context": context, "pin_memory": self.pin_memory}
        return iter(DataLoader(self.val, self.batch_size, **options))
