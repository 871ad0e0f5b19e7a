"""Live progress from training workers to the driver, through one named Ray actor per job.

Rank 0 of each stage sends small updates (fire-and-forget, so training never waits on the display); the driver
polls `snapshot()` and draws the progress bars.
"""

from __future__ import annotations

import functools

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self):
        self.stages: dict[str, dict] = {}

    def update(self, stage: str, fields: dict) -> None:
        self.stages.setdefault(stage, {}).update(fields)

    def snapshot(self) -> dict[str, dict]:
        return self.stages


def board_name(job: str) -> str:
    return f"kdpipe-progress-{job}"


def open_board(job: str) -> ray.actor.ActorHandle:
    return ProgressBoard.options(name=board_name(job), get_if_exists=True).remote()


@functools.cache
def _find_board(job: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(board_name(job))
    except ValueError:  # no driver is watching (a stage run outside `kdpipe run`)
        return None


def report_progress(job: str, stage: str, **fields) -> None:
    board = _find_board(job)
    if board is not None:
        board.update.remote(stage, fields)
