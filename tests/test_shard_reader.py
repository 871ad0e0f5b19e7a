"""The shard reader: each rank's and DataLoader worker's range, bad-data policies, URLs."""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from kdpipe.data import NORMALIZATION, prepare_data
from kdpipe.data.device_decode import EncodedBatch
from kdpipe.data.loaders import open_data
from kdpipe.data.shard_reader import BadDataError, cut_ranges, range_lengths
from kdpipe.data.shards import read_manifest
from kdpipe.errors import UserError
from kdpipe.job.spec import DataSpec
from tests.shard_damage import garble_image, train_shard


def shard_spec(folder: Path | str, **fields) -> DataSpec:
    return DataSpec(**{"source": "shards", "path": str(folder), "image_size": 16, "batch_size": 32, **fields})


def all_keys(folder: Path, split: str) -> set[str]:
    """Every sample key of a split, read from its tar files."""
    found = set()
    for shard in read_manifest(folder)["splits"][split]["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            found |= {m.name.split(".")[0] for m in tar}
    return found


def test_ranges_are_whole_batches_cut_from_the_shards_in_order():
    # 12 samples, 2 ranks x 2 workers, batch 2: 3 steps per rank, dealt to its workers as 2 + 1 batches.
    assert range_lengths(12, world=2, workers=2, batch=2) == [4, 2, 4, 2]
    assert cut_ranges([("a", 5), ("b", 3), ("c", 4)], [4, 2, 4, 2]) == [
        [("a", 0, 4)],
        [("a", 4, 5), ("b", 0, 1)],
        [("b", 1, 3), ("c", 0, 2)],
        [("c", 2, 4)],
    ]
    # 13 samples, 2 ranks, batch 3: 2 steps each; the last sample sits this epoch out.
    assert range_lengths(13, world=2, workers=1, batch=3) == [6, 6]


def test_two_epochs_in_one_process_per_rank(jpeg_shards):
    """The readers of 2 ranks with 2 loader workers each: in every epoch the same number of whole batches on each
    rank from 7 shards, every training sample exactly once across ranks, in a new order; every held-out sample
    once. (Read inside Ray Train workers and scored over 2 ranks: test_real_data.)"""
    spec = shard_spec(jpeg_shards, loader_workers=2)
    prepared = prepare_data(spec)
    assert len(read_manifest(jpeg_shards)["splits"]["train"]["shards"]) == 7
    readers = [open_data(prepared, spec, 0, rank, 2) for rank in range(2)]
    orders = []
    for epoch in range(2):
        batches = [list(r.keyed_train_batches(epoch)) for r in readers]
        assert [len(b) for b in batches] == [32, 32] == [r.steps_per_epoch(epoch) for r in readers]
        assert all(len(ks) == 32 for rank in batches for _, _, ks, _ in rank)
        keys = Counter(k for rank in batches for _, _, ks, _ in rank for k in ks)
        assert keys.keys() == all_keys(jpeg_shards, "train") and set(keys.values()) == {1}
        orders.append([k for _, _, ks, _ in batches[0] for k in ks])
    assert orders[0] != orders[1]  # a new order every epoch
    val_keys = Counter(k for r in readers for _, _, ks, _ in r.keyed_val_batches() for k in ks)
    assert val_keys.keys() == all_keys(jpeg_shards, "val") and set(val_keys.values()) == {1}
    images, labels = next(readers[0].train_batches(0))
    assert images.dtype == torch.uint8 and images.shape == (32, 3, 16, 16) and labels.max() < 8
    inputs = readers[0].inputs(images, torch.device("cpu"))  # normalized where the model runs
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[prepared.normalization])
    torch.testing.assert_close(inputs, (images / 255 - mean) / std)
    assert inputs.is_contiguous(memory_format=torch.channels_last)


def test_augmenting_without_loader_workers_depends_on_the_epoch_not_on_what_ran_before(jpeg_shards):
    """Read in the training process, an epoch's random crops and flips come from a stream of their own seeded by
    (seed, epoch, rank), as in a loader worker: epoch 1 read by a fresh reader (a run resumed at epoch 1) equals
    epoch 1 read after epoch 0 with the training's own draws between its batches, and those draws are the ones
    the training would make without any reading."""
    spec = shard_spec(jpeg_shards, loader_workers=0, augment=True)
    prepared = prepare_data(spec)
    resumed = [images for images, _ in itertools.islice(open_data(prepared, spec, 0, 0, 2).train_batches(1), 3)]
    reader = open_data(prepared, spec, 0, 0, 2)
    list(itertools.islice(reader.train_batches(0), 3))
    torch.manual_seed(123)
    batches, draws = [], []
    for images, _ in itertools.islice(reader.train_batches(1), 3):
        batches.append(images)
        draws.append(torch.rand(4))  # a training step's draws (DGKD's drops, dropout)
    for images, expected in zip(batches, resumed, strict=True):
        torch.testing.assert_close(images, expected, rtol=0, atol=0)
    torch.manual_seed(123)
    torch.testing.assert_close(torch.stack(draws), torch.stack([torch.rand(4) for _ in draws]), rtol=0, atol=0)


def test_a_bad_image_fails_the_epoch_naming_the_shard(jpeg_shards, tmp_path):
    folder = Path(shutil.copytree(jpeg_shards, tmp_path / "copy"))
    shard = train_shard(folder, 3)
    key = garble_image(shard, 7)
    # In the reading process itself: a DataLoader worker re-raises the same error with the same last line, but
    # its workers, left mid-epoch, take 10 s to shut down.
    spec = shard_spec(folder, loader_workers=0)
    reader = open_data(prepare_data(spec), spec, 0, 0, 1)
    with pytest.raises(BadDataError, match=f"{shard}: undecodable image {key}"):
        for _ in reader.train_batches(0):
            pass


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_skip_counts_bad_samples_and_keeps_every_batch(jpeg_shards, tmp_path, decode):
    """A garbled image (its header intact: on the device path its worker passes it, the decoder then fails) and a
    lost shard, skipped and counted."""
    folder = Path(shutil.copytree(jpeg_shards, tmp_path / "copy"))
    garble_image(train_shard(folder, 3), 7)
    lost = train_shard(folder, 5)
    lost_count = read_manifest(folder)["splits"]["train"]["shards"][5]["count"]
    lost.unlink()
    spec = shard_spec(folder, loader_workers=2, bad_samples="skip", decode=decode)
    reader = open_data(prepare_data(spec), spec, 0, 0, 1)
    batches = [(reader.inputs(images, torch.device("cpu")), labels) for images, labels in reader.train_batches(0)]
    assert len(batches) == 64 and all(len(labels) == len(images) == 32 for images, labels in batches)
    assert reader.skipped == 1 + lost_count
    assert sum(len(labels) for _, labels in reader.val_batches()) == 352 and reader.skipped == 1 + lost_count


@pytest.fixture
def http_server(jpeg_shards):
    """The shard folder served over HTTP on loopback: what an object store's HTTPS endpoint looks like."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(jpeg_shards)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait()


def test_shards_read_from_a_url_as_from_the_folder(jpeg_shards, http_server):
    local, remote = shard_spec(jpeg_shards), shard_spec(http_server)
    assert prepare_data(remote).identity == prepare_data(local).identity
    keys = [
        [k for _, _, ks, _ in open_data(prepare_data(spec), spec, 0, 1, 2).keyed_train_batches(0) for k in ks]
        for spec in (local, remote)
    ]
    assert keys[0] == keys[1] and len(keys[0]) == 1024
    with pytest.raises(UserError, match="has no readable manifest.json"):
        prepare_data(shard_spec(http_server + "/nowhere"))


@pytest.mark.parametrize("path", ["pipe:cat /etc/passwd", "ftp://host/shards"])
def test_urls_that_would_run_a_shell_or_are_unknown_are_refused(path):
    with pytest.raises(ValueError, match="expected a folder or a https/http/gs/s3 URL"):
        shard_spec(path)


@pytest.mark.parametrize(("size", "workers"), [(24, 0), (80, 2)])  # CIFAR's recipe in-process; ImageNet's, 2 workers
def test_decoding_where_the_model_runs_gives_the_loader_workers_views(jpeg_shards, size, workers):
    """`data.decode: gpu` on the CPU: workers read bytes and draw each view's choices, the training process decodes
    and augments whole batches, and every training and held-out input equals the CPU path's; a resumed epoch
    replays the same views from its step on."""
    cpu, device = (shard_spec(jpeg_shards, image_size=size, loader_workers=workers, decode=d) for d in ("cpu", "gpu"))
    prepared, here = prepare_data(cpu), torch.device("cpu")
    readers = {spec.decode: open_data(prepared, spec, 0, 1, 2) for spec in (cpu, device)}
    assert isinstance(next(readers["gpu"].train_batches(1))[0], EncodedBatch)  # bytes out of the workers
    epochs = {d: [r.inputs(x, here) for x, _ in r.train_batches(1)] for d, r in readers.items()}
    assert len(epochs["gpu"]) == len(epochs["cpu"]) == readers["cpu"].steps_per_epoch(1)
    for a, b in zip(epochs["cpu"], epochs["gpu"], strict=True):
        assert torch.equal(a, b)
    resumed = [readers["gpu"].inputs(x, here) for x, _ in readers["gpu"].train_batches(1, start=5)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, epochs["cpu"][5:], strict=True))
    held_out = {d: [r.inputs(x, here) for x, _ in r.val_batches()] for d, r in readers.items()}
    assert all(torch.equal(a, b) for a, b in zip(held_out["cpu"], held_out["gpu"], strict=True))
