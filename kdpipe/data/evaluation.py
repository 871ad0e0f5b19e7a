"""A data set read for `kdpipe eval`: every image of one split as stored (uint8, H x W x 3), with its label and
the set's class names, from any source a job reads (`SOURCE:PATH`), not only the job's own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kdpipe.data.convert import open_source, sample_record
from kdpipe.data.shard_reader import read_range
from kdpipe.data.shards import decode_image, read_manifest
from kdpipe.errors import UserError

SOURCES = ("imagefolder", "shards", "cifar", "fashion-mnist")
FORMATS = {"imagefolder": ("imagefolder",), "cifar": ("cifar10", "cifar100"), "fashion-mnist": ("fashion-mnist",)}


@dataclass(frozen=True)
class EvalSplit:
    classes: list[str]
    count: int
    path: str
    source: str
    split: str

    def samples(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(H x W x 3 uint8 image, label) in the split's stored order."""
        if self.source == "shards":  # every sample of the split as one range, as the shard reader reads one
            pieces = [
                (shard["name"], 0, shard["count"]) for shard in read_manifest(self.path)["splits"][self.split]["shards"]
            ]
            for image, label, _, _ in read_range(pieces, self.path, decode_image, skip=False, keep_length=False):
                yield image.permute(1, 2, 0), label
            return
        source = open_source(Path(self.path))
        for index in range(self.count):
            _, data, label = sample_record(source, self.split, index)
            yield decode_image(data).permute(1, 2, 0), label


def open_split(data: str, split: str) -> EvalSplit:
    """`SOURCE:PATH` (e.g. `imagefolder:/data/pets`) and a split name; one line naming what is wrong otherwise."""
    source, _, path = data.partition(":")
    if source not in SOURCES or not path:
        raise UserError(f"--data: expected SOURCE:PATH with SOURCE one of {', '.join(SOURCES)}, got '{data}'")
    if source == "shards":
        try:
            manifest = read_manifest(path)
        except (OSError, ValueError) as err:
            raise UserError(f"--data: {path} has no readable manifest.json ({type(err).__name__})") from None
        splits = manifest["splits"]
        if split not in splits:
            raise UserError(f"--split: {path} has no split '{split}'; it has {', '.join(splits)}")
        return EvalSplit(list(manifest["classes"]), splits[split]["count"], path, source, split)
    found = open_source(Path(path))
    if found.format not in FORMATS[source]:
        raise UserError(f"--data: {path} holds {found.format} data, not {source}")
    if split not in found.sizes:
        raise UserError(f"--split: {source} data has the splits {', '.join(found.sizes)}, not '{split}'")
    return EvalSplit(found.classes, found.sizes[split], str(Path(path).resolve()), source, split)
