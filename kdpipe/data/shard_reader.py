"""Reading WebDataset shards in a training job: every rank the same number of batches, every sample once.

Splitting an epoch by whole shards (webdataset's `split_by_node`) gives ranks unequal sample counts whenever the
shard count does not divide evenly, and a rank that runs out first leaves the others waiting in a collective.
Instead, an epoch puts the shards in an order drawn from (seed, epoch) and reads their samples as one sequence,
cut into `world x workers` contiguous ranges of whole batches: one per (rank, DataLoader worker), the workers' ranges
dealt by webdataset's `split_by_worker`. Every rank then takes the same number of steps, each sample is read at
most once, and only the sequence's last `< world x batch_size` samples sit out the epoch (a different tail every
epoch). A range starts and ends inside a shard at most once each, so each worker reads at most two shards in part.

A bad shard or image either stops the stage with one line naming the shard (`bad_samples: fail`), or is skipped
and counted (`skip`): the range then repeats some of its own recent samples to keep its batch count, since a
short rank would hang the others.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import webdataset as wds
from torchvision.transforms import v2

from kdpipe.data import NORMALIZATION, PreparedData, decodes_on_cuda, held_out_geometry
from kdpipe.data.device_decode import EncodedBatch, decode_batch, encode
from kdpipe.data.order import LOADER_CONTEXT, epoch_seed, loader_generator, own_random_stream
from kdpipe.data.shards import IMAGE_EXTENSIONS, BadImage, decode_image, location_of, read_manifest
from kdpipe.job.spec import DataSpec

Piece = tuple[str, int, int]  # shard name, first sample, end sample (exclusive)
Sample = tuple[torch.Tensor, int, str, int]  # uint8 image, label, key, 1 if read (0: a repeat standing in)
SHUFFLE_BUFFER = 1000  # samples each DataLoader worker shuffles among, after the per-epoch shard order
REPEAT_POOL = 16  # recent samples a range keeps to stand in for skipped ones


class BadDataError(RuntimeError):
    """A shard that cannot be read or an image that does not decode, under `bad_samples: fail`."""


def cut_ranges(shards: list[tuple[str, int]], lengths: list[int]) -> list[list[Piece]]:
    """Consecutive ranges of the given lengths over the shards' samples taken in order."""
    remaining = iter(shards)
    name, count, offset = "", 0, 0
    ranges = []
    for length in lengths:
        pieces = []
        while length > 0:
            while offset == count:
                (name, count), offset = next(remaining), 0
            take = min(length, count - offset)
            pieces.append((name, offset, offset + take))
            offset, length = offset + take, length - take
        ranges.append(pieces)
    return ranges


def range_lengths(total: int, world: int, workers: int, batch: int) -> list[int]:
    """Samples for each (rank, worker), rank-major: whole batches, the same number of them on every rank, shared
    out as evenly as they go among a rank's workers."""
    steps = total // (batch * world)
    per_worker = [(steps // workers + (w < steps % workers)) * batch for w in range(workers)]
    return per_worker * world


def decoded(transform: v2.Transform, data: bytes) -> torch.Tensor:
    """A sample's view, decoded and transformed in the loader worker (`data.decode: cpu`)."""
    return transform(decode_image(data))


def read_range(
    pieces: list[Piece], folder: str, prepare: Callable[[bytes], Any], skip: bool, keep_length: bool
) -> Iterator[Sample]:
    """The samples of one range, each image's bytes made ready by `prepare` (`decoded`, or `device_decode.encode`),
    which raises `BadImage`. Skipped samples are replaced by repeats of recent ones when `keep_length` (training),
    dropped otherwise (evaluation)."""
    recent: deque[Sample] = deque(maxlen=REPEAT_POOL)
    missing = 0
    for name, first, end in pieces:
        url = location_of(folder, name)
        reached = first
        try:
            for sample in itertools.islice(wds.tarfile_samples([{"url": url}]), first, end):
                reached += 1
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                try:
                    if image is None:
                        raise BadImage("no jpg or png in the sample")
                    pixels = prepare(image)
                except BadImage as err:
                    if not skip:
                        raise BadDataError(f"{url}: undecodable image {sample['__key__']} ({err})") from None
                    missing += 1
                    continue
                recent.append((pixels, int(sample["cls"]), sample["__key__"], 1))
                yield recent[-1]
            if reached < end:
                raise BadDataError(f"{url}: ends after {reached} samples, the manifest says at least {end}")
        except Exception as err:
            if not skip:
                raise BadDataError(f"{url}: {shard_problem(err)}") from None
            missing += end - reached
    if keep_length and missing:
        if not recent:
            raise BadDataError(f"{location_of(folder, pieces[0][0])}: no readable sample in this worker's range")
        for pixels, label, key, _ in itertools.islice(itertools.cycle(list(recent)), missing):
            yield pixels, label, key, 0


def shard_problem(err: Exception) -> str:
    if isinstance(err, BadDataError):
        return str(err).split(": ", 1)[-1]
    if isinstance(err, FileNotFoundError):
        return "missing"
    detail = err.args[0] if err.args else ""  # webdataset appends the URL and stream to the arguments
    return f"unreadable ({type(err).__name__}: {detail})"


def collate(samples: list[Sample], train: bool | None = None) -> tuple[Any, torch.Tensor, list[str], torch.Tensor]:
    """A batch: its images stacked, or (`train` given: the device path) their encoded samples for the training
    process to decode with the training or held-out transforms."""
    images, labels, keys, read = zip(*samples, strict=True)
    batch = torch.stack(images) if train is None else EncodedBatch(list(images), train, list(keys))
    return batch, torch.tensor(labels), list(keys), torch.tensor(read)


def geometry(size: int, train: bool) -> v2.Compose:
    """ImageNet recipe (RandomResizedCrop + flip; resize + centre crop) above 64 px, CIFAR recipe below it, on
    uint8 image tensors: cropping first means only the crop is resized."""
    if size > 64 and train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    resize, crop = held_out_geometry(size)
    steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]
    if train:
        steps += [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()]
    return v2.Compose(steps)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` in NHWC: convolutions then run NHWC, faster on CPU (oneDNN) and the layout tensor cores
    want on GPU (parameters keep the default layout, which DeepSpeed's broadcast and ZeRO's flat
    buffers expect). Asynchronous from page-locked memory."""
    return images.to(device, memory_format=torch.channels_last, non_blocking=True)


class ShardData:
    def __init__(self, prepared: PreparedData, spec: DataSpec, seed: int, rank: int, world: int, pin_memory: bool):
        manifest = read_manifest(prepared.path)
        self.num_classes = len(manifest["classes"])
        self.folder, self.batch_size, self.workers = prepared.path, spec.batch_size, spec.loader_workers
        self.skip = spec.bad_samples == "skip"
        self.seed, self.rank, self.world = seed, rank, world
        self.train_shards = [(s["name"], s["count"]) for s in manifest["splits"]["train"]["shards"]]
        val_shards = [(s["name"], s["count"]) for s in manifest["splits"]["val"]["shards"]]
        self.val_ranges = self._rank_ranges(val_shards, 1)  # the same every epoch; batch 1: every sample dealt out
        # uint8 batches out of the workers and onto the device: a quarter of float32's bytes to move, and the float
        # conversion runs where the model does (on a GPU, a CPU pass over every batch capped the reader's rate)
        self.train_tf, self.val_tf = (geometry(prepared.image_size, t) for t in (spec.augment, False))
        self.on_device = spec.decode == "gpu" or decodes_on_cuda(spec)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[prepared.normalization])
        self.scale, self.shift = 1 / (255 * std), -mean / std
        self.pin_memory = pin_memory
        self.skipped = 0  # samples skipped in the current epoch's batches (bad_samples: skip)

    def steps_per_epoch(self, epoch: int) -> int:
        return sum(count for _, count in self.train_shards) // (self.batch_size * self.world)

    def _rank_ranges(self, shards: list[tuple[str, int]], batch: int) -> list[list[Piece]]:
        """This rank's ranges, one per DataLoader worker."""
        workers = max(self.workers, 1)
        lengths = range_lengths(sum(count for _, count in shards), self.world, workers, batch)
        return cut_ranges(shards, lengths)[self.rank * workers : (self.rank + 1) * workers]

    def _batches(self, ranges: list[list[Piece]], transform, train: bool, generator=None, shuffle_seed=None):
        prepare = functools.partial(encode if self.on_device else decoded, transform)
        stages = [
            functools.partial(iter, ranges),
            wds.split_by_worker,
            wds.pipelinefilter(read_samples)(self.folder, prepare, self.skip, train),
        ]
        if shuffle_seed is not None:
            stages.append(wds.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed))
        collation = functools.partial(collate, train=train) if self.on_device else collate
        stages.append(wds.batched(self.batch_size, collation_fn=collation, partial=not train))
        pipeline = wds.DataPipeline(*stages)
        context = LOADER_CONTEXT if self.workers else None
        loader = wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=self.workers,
            generator=generator,
            multiprocessing_context=context,
            pin_memory=self.pin_memory,
        )
        return own_random_stream(loader, generator) if generator is not None and not self.workers else loader

    def keyed_train_batches(self, epoch: int, start: int = 0) -> Iterator[tuple]:
        """(uint8 images, labels, sample keys, read flags) of this rank's steps `start..` in `epoch`."""
        order = sorted(self.train_shards)
        random.Random(epoch_seed(self.seed, epoch)).shuffle(order)
        ranges = self._rank_ranges(order, self.batch_size)
        generator = loader_generator(self.seed, epoch, self.rank)
        shuffle_seed = epoch_seed(self.seed, epoch, self.rank)
        # Resuming mid-epoch reads the first `start` batches again (same order, same augmentation) but trains none.
        return itertools.islice(self._batches(ranges, self.train_tf, True, generator, shuffle_seed), start, None)

    def keyed_val_batches(self) -> Iterator[tuple]:
        return iter(self._batches(self.val_ranges, self.val_tf, False))

    def _counted(self, batches: Iterable[tuple], expected: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        read = 0
        for images, labels, _, flags in batches:
            read += int(flags.sum())
            yield images, labels
        self.skipped += expected - read

    def inputs(self, images: torch.Tensor | EncodedBatch, device: torch.device) -> torch.Tensor:
        """uint8 pixels (or, on the device path, encoded samples decoded and augmented here) to normalized float32
        on `device`."""
        if self.scale.device.type != device.type:  # once: each copy from ordinary memory waits for the GPU
            self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        if isinstance(images, EncodedBatch):
            images = self._decoded(images, device)
        return to_device(images, device).float().mul_(self.scale).add_(self.shift)

    def _decoded(self, batch: EncodedBatch, device: torch.device) -> torch.Tensor:
        """The device path's batch; an image whose bytes do not decode (its header did, in the worker) is skipped
        and counted, a stand-in view keeping the batch whole, or stops the stage, by `bad_samples`."""
        images, bad = decode_batch(batch, self.train_tf if batch.train else self.val_tf, device)
        if bad and not self.skip:
            raise BadDataError(f"{self.folder}: undecodable image {batch.keys[bad[0]]}")
        self.skipped += len(bad)
        return images

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped = 0
        expected = (self.steps_per_epoch(epoch) - start) * self.batch_size
        return self._counted(self.keyed_train_batches(epoch, start), expected)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        expected = sum(end - first for pieces in self.val_ranges for _, first, end in pieces)
        return self._counted(self.keyed_val_batches(), expected)


def read_samples(
    ranges: Iterable[list[Piece]], folder: str, prepare: Callable[[bytes], Any], skip: bool, keep_length: bool
) -> Iterator[Sample]:
    for pieces in ranges:
        yield from read_range(pieces, folder, prepare, skip, keep_length)
