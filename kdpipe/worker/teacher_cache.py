"""The teacher-output cache: a teacher's logits on exactly the views a student trains on, computed once and read by
every later student, rerun and search trial of the same teacher.

Why it is exact: kdpipe's readers make each training batch a function of (seed, epoch, rank, step), given the
data's content, the reading settings and the number of ranks (`kdpipe.data.order`). A teacher's logits on that
batch are then a function of the same, of its weights (its stage run) and of the precision it runs in. Those make
the cache's key (`kdpipe.job.cache_policy`, which also decides which stages use the cache): a folder of one file
per (epoch, rank), holding each step's logits in fp16 (`[steps, batch, classes]`), a signature of each step's
images and which steps are filled. A step the file lacks, or whose images do not match its signature (a reader that
changed under the same key), is never served: the teacher runs, and the step is filled. Cold or warm, a student
gets the logits as stored, so a cold and a warm cache train identically and the online teacher differs by fp16
rounding only.

For many classes a cache may keep FKD's soft labels instead (`TopK`): each image's k largest logits and the rest
of its probability mass spread evenly over the other classes. That approximates, so it is part of the stage's
fingerprint; the exact cache is in none.

Files are written whole under a temporary name and then renamed, so a stage killed while writing leaves no
half-written file under a cache name; a file that still does not read, or whose checksum, key or shape does not
match, is named in one line and rebuilt. Two stages filling the same file at once merge what is on storage with
their own steps before writing; at worst one's steps are lost and computed again later.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow.fs
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

STORED = torch.float16
COMPLETE = "complete"  # in a file's metadata: "True" when every step of its epoch is filled
SIGNATURES, FILLED = "signatures", "filled"
MAX_HEADER = 1 << 20  # bytes: a cache file's header is a few hundred


class Exact:
    """The full logits in fp16."""

    fields = ("logits",)

    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": logits.to(STORED)}

    def decode(self, row: dict[str, torch.Tensor]) -> torch.Tensor:
        return row["logits"]


@dataclass(frozen=True)
class TopK:
    """FKD's soft labels (Shen & Xing, ECCV 2022) as logits: the k largest in fp16 with their classes, and one
    logit for every other class, chosen so that at temperature 1 they share evenly the probability mass the k
    leave. The top k keep their probabilities exactly; at other temperatures it is an approximation."""

    k: int
    classes: int
    fields = ("values", "indices", "rest")

    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logits.float()
        values, indices = logits.topk(self.k, 1)
        values = values.to(STORED)
        total = logits.logsumexp(1)
        kept = (values.float() - total[:, None]).exp().sum(1)
        rest = ((1 - kept).clamp_min(1e-12) / (self.classes - self.k)).log() + total
        return {"values": values, "indices": indices.to(torch.int32), "rest": rest}

    def decode(self, row: dict[str, torch.Tensor]) -> torch.Tensor:
        values = row["values"].float()
        logits = row["rest"][:, None].expand(len(values), self.classes).clone()
        return logits.scatter_(1, row["indices"].long(), values)


Encoding = Exact | TopK


def view_signature(images: torch.Tensor) -> torch.Tensor:
    """Two numbers per image that tell views apart: the sum of its pixels, and their sum weighted by position
    (a flip or a shifted crop changes it). Float32, on the CPU."""
    height, width = images.shape[-2:]
    rows = torch.arange(1, height + 1, device=images.device, dtype=torch.float32)[:, None] / height
    cols = torch.arange(1, width + 1, device=images.device, dtype=torch.float32)[None, :] / width
    pixels = images.float()
    return torch.stack([pixels.sum((1, 2, 3)), (pixels * (rows + 2 * cols)).sum((1, 2, 3))], 1).cpu()


def same_views(stored: torch.Tensor, found: torch.Tensor) -> bool:
    """Signatures equal up to float rounding (the same images summed on another device or by another kernel)."""
    return bool(torch.allclose(stored, found, rtol=1e-4, atol=1e-2))


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def key_folder(folder: str, key: str) -> str:
    return f"{folder.rstrip('/')}/{key}"


def epoch_file(folder: str, epoch: int, rank: int) -> str:
    return f"{folder}/epoch-{epoch:05d}-rank-{rank:04d}.safetensors"


@dataclass
class EpochEntries:
    """One (epoch, rank)'s steps as held in memory: per stored tensor, one row per step (allocated when the first
    step is filled), and which steps are filled."""

    steps: int
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [steps, ...]
    filled: torch.Tensor | None = None  # [steps] bool; None: none yet
    added: int = 0  # steps filled since it was read

    def __post_init__(self) -> None:
        if self.filled is None:
            self.filled = torch.zeros(self.steps, dtype=torch.bool)

    def row(self, step: int) -> dict[str, torch.Tensor]:
        return {name: rows[step] for name, rows in self.rows.items()}

    def put(self, step: int, row: dict[str, torch.Tensor]) -> None:
        for name, value in row.items():
            if name not in self.rows:
                self.rows[name] = torch.zeros(self.steps, *value.shape, dtype=value.dtype)
            self.rows[name][step] = value
        self.filled[step] = True
        self.added += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.rows, FILLED: self.filled.to(torch.uint8)}


class TeacherCache:
    """One teacher's cache as one rank reads and fills it: the file of the epoch in hand, whole in memory."""

    def __init__(self, root: str, key: str, rank: int, encoding: Encoding | None = None):
        self.filesystem, folder = pyarrow.fs.FileSystem.from_uri(root)
        self.folder, self.key, self.rank = key_folder(folder, key), key, rank
        self.encoding = encoding or Exact()
        self.epoch, self.entries = -1, EpochEntries(0)
        self.mismatched: list[int] = []  # filled steps of this epoch whose images differ from the cached views

    def path(self, epoch: int) -> str:
        return epoch_file(self.folder, epoch, self.rank)

    def begin(self, epoch: int, steps: int) -> None:
        self.epoch, self.entries, self.mismatched = epoch, self.read(epoch, steps), []

    def lookup(self, step: int, signature: torch.Tensor) -> torch.Tensor | None:
        """The stored logits of `step` if it is filled with these very views; else None."""
        entries = self.entries
        if not entries.filled[step]:
            return None
        if not same_views(entries.rows[SIGNATURES][step], signature):
            self.mismatched.append(step)
            return None
        return self.encoding.decode(entries.row(step))

    def put(self, step: int, signature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Store `step`'s logits; returns them as a lookup will (rounded, or approximated)."""
        row = self.encoding.encode(logits.detach().cpu())
        self.entries.put(step, {**row, SIGNATURES: signature})
        return self.encoding.decode(row)

    def end(self) -> None:
        """Store the epoch's file if this run filled steps it lacked, merged with what storage holds by now."""
        entries = self.entries
        if self.mismatched:
            print(
                f"teacher cache: {self.path(self.epoch)}: the images of {len(self.mismatched)} step(s) (first: "
                f"{self.mismatched[0]}) differ from the cached views; the teacher ran for them",
                file=sys.stderr,
                flush=True,
            )
        if not entries.added:
            return
        if not entries.filled.all():  # steps another stage may have filled meanwhile
            stored = self.read(self.epoch, entries.steps, quiet=True)
            for step in torch.nonzero(stored.filled & ~entries.filled).flatten().tolist():
                entries.put(step, stored.row(step))
        tensors = entries.tensors()
        metadata = {"key": self.key, "epoch": str(self.epoch), "rank": str(self.rank), "checksum": checksum(tensors)}
        metadata[COMPLETE] = str(bool(entries.filled.all()))
        self.filesystem.create_dir(self.folder, recursive=True)
        temporary = f"{self.path(self.epoch)}.{uuid.uuid4().hex}.partial"
        with self.filesystem.open_output_stream(temporary) as stream:
            stream.write(save(tensors, metadata))
        self.filesystem.move(temporary, self.path(self.epoch))

    def read(self, epoch: int, steps: int, quiet: bool = False) -> EpochEntries:
        """The stored file of `epoch` if it is whole and matches; nothing (after one line naming it) if not."""
        path = self.path(epoch)
        if self.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
            return EpochEntries(steps)
        try:
            with self.filesystem.open_input_file(path) as stream:
                tensors, metadata = load_file_with_metadata(stream.readall())
            problem = self.mismatch(tensors, metadata, epoch, steps)
        except (SafetensorError, OSError, ValueError) as err:
            problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if problem:
            if not quiet:
                print(f"teacher cache: {path}: {problem}; rebuilding it", file=sys.stderr, flush=True)
            return EpochEntries(steps)
        filled = tensors.pop(FILLED).bool()
        return EpochEntries(steps, tensors, filled)

    def mismatch(self, tensors: dict, metadata: dict, epoch: int, steps: int) -> str:
        expected = {"key": self.key, "epoch": str(epoch), "rank": str(self.rank)}
        found = {name: metadata.get(name) for name in expected}
        if found != expected:
            return f"written for {found}, not {expected}"
        names = {*self.encoding.fields, SIGNATURES, FILLED}
        if set(tensors) != names or any(len(t) != steps for t in tensors.values()):
            return f"expected {steps} steps of {', '.join(sorted(names))}"
        if checksum(tensors) != metadata.get("checksum"):
            return "checksum mismatch (corrupt)"
        return ""


def complete(root: str, keys: list[str], epochs: int, world: int) -> bool:
    """Whether the cache holds every step of every epoch and rank under each key, by the files' headers alone (the
    driver's cheap look before a search; a file that lied would be caught by its checksum when read, and rebuilt)."""
    filesystem, folder = pyarrow.fs.FileSystem.from_uri(root)
    paths = [epoch_file(key_folder(folder, k), e, r) for k in keys for e in range(epochs) for r in range(world)]
    for path, info in zip(paths, filesystem.get_file_info(paths), strict=True):
        if info.type != pyarrow.fs.FileType.File:
            return False
        try:
            with filesystem.open_input_file(path) as stream:
                metadata = read_metadata(stream)
        except ValueError:
            return False
        if metadata.get(COMPLETE) != "True":
            return False
    return True


def read_metadata(stream: BinaryIO) -> dict[str, str]:
    """The metadata of a safetensors file (its header's `__metadata__`), reading only the header from `stream`;
    ValueError if the header is not there whole."""
    length = int.from_bytes(stream.read(8), "little")
    if length > MAX_HEADER:
        raise ValueError(f"a header of {length} bytes")
    header = stream.read(length)
    if len(header) < length:
        raise ValueError(f"a header of {length} bytes in a file of {8 + len(header)}")
    return json.loads(header).get("__metadata__") or {}


def load_file_with_metadata(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and its metadata."""
    return load(data), read_metadata(io.BytesIO(data))


class CachedTeacher(nn.Module):
    """A frozen teacher that answers from its cache where the cache holds the current step's views, and runs
    (filling the cache) where it does not. The stage sets `step` before each training step; evaluation and
    anything outside a training epoch (`step` None) run the teacher."""

    def __init__(self, teacher: nn.Module, cache: TeacherCache):
        super().__init__()
        self.teacher, self.cache = teacher, cache
        self.step: int | None = None
        self.computed = self.read = 0  # training batches this epoch: teacher runs and cache reads

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.step is None:
            return self.teacher(images)
        signature = view_signature(images)
        logits = self.cache.lookup(self.step, signature)
        if logits is not None:
            self.read += 1
        else:
            self.computed += 1
            logits = self.cache.put(self.step, signature, self.teacher(images))  # as a warm cache will serve them
        return logits.to(images.device, images.dtype, non_blocking=True)


class TeacherCaches:
    """The engine's view of a stage's cached teachers: told each epoch and step, it points every teacher at it."""

    def __init__(self, teachers: list[CachedTeacher]):
        self.teachers = teachers

    def begin_epoch(self, epoch: int, steps: int) -> None:
        for teacher in self.teachers:
            teacher.cache.begin(epoch, steps)
            teacher.computed = teacher.read = 0

    def at_step(self, step: int) -> None:
        for teacher in self.teachers:
            teacher.step = step

    def end_epoch(self) -> dict[str, float]:
        """Store what the epoch filled; the epoch's counts of teacher batches computed and read from the cache."""
        if not self.teachers:
            return {}
        for teacher in self.teachers:
            teacher.step = None
            teacher.cache.end()
        return {
            "teacher_cache/computed": float(sum(t.computed for t in self.teachers)),
            "teacher_cache/read": float(sum(t.read for t in self.teachers)),
        }
