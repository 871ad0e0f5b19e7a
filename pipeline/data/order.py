"""Seeds of an epoch's sample order and augmentation, and how loader workers start, shared by every reader.

Each epoch's batches are a function of (job seed, epoch, rank): resuming at step k of an epoch replays the same
order and starts at batch k, so no sample is trained twice or skipped.
"""

from __future__ import annotations

import multiprocessing

import torch

# DataLoader workers start from a fork server, not by forking the training process: a Ray Train worker runs many
# threads (gRPC, MLflow, Ray Train's own), and a child forked while one of them holds a lock can hang for good.
# The server is a fresh single-threaded process that imports the readers once; forks of it start in milliseconds.
LOADER_CONTEXT = multiprocessing.get_context("forkserver")
LOADER_CONTEXT.set_forkserver_preload(["pipeline.data.loaders"])


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's shuffle (rank 0: the order all ranks share) or of one rank's sample order and
    augmentation; different for every (job seed, epoch, rank)."""
    return (seed * 100003 + epoch) * 1009 + rank


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the DataLoader's workers, and so their augmentation, the same way whenever the epoch is replayed."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
