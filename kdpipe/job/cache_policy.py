"""The teacher-output cache's policy, in one place: which stages read their teachers through it, what of it enters
a fingerprint, where it lives, how much of each output it keeps, and the key a teacher's outputs are filed under.
The mechanism (the files, reading and filling them) is `kdpipe.worker.teacher_cache`.

A stage uses the cache when its method learns from its teachers' logits alone (the method says so); its own
`teacher_cache` setting wins over the job's. The exact cache serves the very logits the teacher computes (in fp16)
on the very views trained on, so a student learns the same from it: it is in no fingerprint. `{top_k: K}` keeps
FKD's soft labels, an approximation, and enters the fingerprint of each stage that reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kdpipe.job.spec import TeacherCacheMode, TopKCache, workdir_path

FOLDER = "teacher-cache"  # under the job's workdir
FORMAT = 2  # raised whenever what a file holds, how a key is made or what a precision means changes (2: bf16 and
# fp16 became autocast over fp32 weights): old files are then never read


def stage_mode(own: TeacherCacheMode | None, job: TeacherCacheMode, cacheable: bool) -> TeacherCacheMode:
    """How a stage's teachers' outputs are cached: its own setting, else the job's; off where its method uses more
    of its teachers than their logits (`cacheable` False) or it has no teachers."""
    return (own or job) if cacheable else "off"


def fingerprint_part(mode: TeacherCacheMode) -> dict | None:
    """What the cache adds to a stage's identity: the approximation a top-k cache makes, nothing for the exact
    cache or none."""
    return mode.model_dump() if isinstance(mode, TopKCache) else None


@dataclass(frozen=True)
class CacheSettings:
    """A stage's cache as its workers use it."""

    root: str  # a folder or URL
    top_k: int = 0  # logits kept per image (FKD's soft labels); 0: all of them

    @property
    def encoding(self) -> str:
        return f"top{self.top_k}" if self.top_k else "fp16"

    def keys(
        self, teacher_runs: list[str], data: str, reading: dict, seed: int, world: int, precision: str
    ) -> list[str]:
        """Each teacher's key for a stage on `world` ranks."""
        return [cache_key(run, data, reading, seed, world, precision, self.encoding) for run in teacher_runs]


def cache_settings(mode: TeacherCacheMode, workdir: str) -> CacheSettings | None:
    """Where a stage's cache lives and what it keeps; None when the stage's teachers run online."""
    if mode == "off":
        return None
    return CacheSettings(workdir_path(workdir, FOLDER), mode.top_k if isinstance(mode, TopKCache) else 0)


def cache_key(
    teacher_run: str, data_identity: str, reading: dict, seed: int, world: int, precision: str, encoding: str = "fp16"
) -> str:
    """What decides a teacher's output on each (epoch, rank, step): its weights, the precision it runs in, and
    everything that decides the views (the data, how it is read, the seed, the ranks); and how it is stored."""
    facts = {
        "format": FORMAT,
        "encoding": encoding,
        "teacher_run": teacher_run,
        "data": data_identity,
        "reading": reading,
        "seed": seed,
        "world": world,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]
