"""Seeds of an epoch's sample order and augmentation, and how loader workers start, shared by every reader.

Each epoch's batches are a function of (job seed, epoch, rank): resuming at step k of an epoch replays the same
order and starts at batch k, so no sample is trained twice or skipped.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")

# DataLoader workers start from a fork server, not by forking the training process: a Ray Train worker runs many
# threads (gRPC, MLflow, Ray Train's own), and a child forked while one of them holds a lock can hang for good.
# The server is a fresh single-threaded process that imports the readers once; forks of it start in milliseconds.
LOADER_CONTEXT = multiprocessing.get_context("forkserver")
LOADER_CONTEXT.set_forkserver_preload(["kdpipe.data.loaders"])


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's shuffle (rank 0: the order all ranks share) or of one rank's sample order and
    augmentation; different for every (job seed, epoch, rank)."""
    return (seed * 100003 + epoch) * 1009 + rank


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the DataLoader's workers, and so their augmentation, the same way whenever the epoch is replayed."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))


def own_random_stream(items: Iterable[T], generator: torch.Generator) -> Iterator[T]:
    """`items` produced with torch's global random state set to a stream of their own, seeded by `generator`, and
    the training's state restored around each: what a DataLoader worker process gets for free, for a reader
    without workers. Its augmentation is then a function of (seed, epoch, rank) like a worker's, whatever the
    process drew before (a resumed run starts at a later epoch) or draws between batches (DGKD's drops)."""
    state, found = torch.Generator().manual_seed(generator.initial_seed()).get_state(), iter(items)
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            item = next(found, None)
            state = torch.get_rng_state()
        if item is None:
            return
        yield item
