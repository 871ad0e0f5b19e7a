"""The stall watchdog: a job that shows no progress for a while gets one line that says so and what is pending.

Progress is anything the driver sees move: a stage's state, a step or epoch a rank 0 reports, a search's trial
counts. The watchdog only speaks, once per stall: a slow start or a long epoch may be what was asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kdpipe.driver.state import StageState


class Watchdog:
    """Fed every poll with the stages' states and what they reported; returns a line when nothing moved for
    `minutes` (0: never)."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.minutes, self.clock = minutes, clock
        self.seen: object = None
        self.since, self.said = clock(), False

    def look(self, states: dict[str, StageState], reported: dict[str, dict]) -> str | None:
        now, seen = self.clock(), (sorted(states.items()), repr(sorted(reported.items())))
        if seen != self.seen:
            self.seen, self.since, self.said = seen, now, False
            return None
        if not self.minutes or self.said or now - self.since < self.minutes * 60:
            return None
        self.said = True
        return f"no progress for {self.minutes:g} min; {pending(states, reported)}"


def pending(states: dict[str, StageState], reported: dict[str, dict]) -> str:
    """The stages not ended, each with what it last reported."""
    parts = []
    for name, state in states.items():
        if state.ended:
            continue
        seen = reported.get(name, {})
        if seen.get("queued"):
            what = f"queued, {seen['queued']}"
        elif "search" in seen:
            counts = seen["search"]
            what = f"searching, {counts['done'] + counts['pruned'] + counts['failed']} trials ended"
        elif "epochs" in seen:
            what = f"epoch {seen['epoch'] + 1}/{seen['epochs']}, step {seen['step']}/{seen['steps']}"
        elif state == StageState.RUNNING:
            what = "starting its workers"
        elif state == StageState.WAITING:
            what = "another kdpipe driver trains it"
        else:
            what = "waiting for its teachers"
        parts.append(f"{name} ({what})")
    return "pending: " + ", ".join(parts) if parts else "nothing pending"
