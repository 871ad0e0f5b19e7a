"""Issue 37: the pure pieces of waiting with a bound: the stall watchdog's line, and a stage's turn on the
cluster."""

from __future__ import annotations

from kdpipe.driver.launcher import fits_beside
from kdpipe.driver.state import StageState
from kdpipe.driver.watchdog import Watchdog

RUNNING, DONE, PENDING, WAITING = StageState.RUNNING, StageState.DONE, StageState.PENDING, StageState.WAITING


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_speaks_once_per_stall_and_lists_what_is_pending():
    clock = Clock()
    watchdog = Watchdog(2, clock)
    states = {"teacher": DONE, "student": RUNNING, "pupil": PENDING, "other": WAITING}
    step = {"student": {"epoch": 0, "epochs": 3, "step": 5, "steps": 40}}
    assert watchdog.look(states, step) is None
    clock.now = 119.0
    assert watchdog.look(states, step) is None
    clock.now = 120.0
    line = watchdog.look(states, step)
    assert line == (
        "no progress for 2 min; pending: student (epoch 1/3, step 5/40), pupil (waiting for its teachers), "
        "other (another kdpipe driver trains it)"
    )
    clock.now = 1000.0
    assert watchdog.look(states, step) is None  # said once for this stall
    # A step moves: the clock starts again, and the next stall is said again.
    moved = {"student": {**step["student"], "step": 6}}
    assert watchdog.look(states, moved) is None
    clock.now = 1119.0
    assert watchdog.look(states, moved) is None
    clock.now = 1120.0
    assert watchdog.look(states, moved).startswith("no progress for 2 min; pending: student (epoch 1/3, step 6/40)")


def test_the_watchdog_names_queued_searching_and_starting_stages_and_can_be_off():
    clock = Clock()
    watchdog = Watchdog(0.5, clock)
    states = {"a": RUNNING, "b": RUNNING, "c": RUNNING}
    reported = {
        "a": {"queued": "its turn comes after b"},
        "b": {"search": {"done": 1, "pruned": 2, "failed": 0, "running": 1, "best": 0.5}},
    }
    watchdog.look(states, reported)
    clock.now = 30.0
    assert watchdog.look(states, reported) == (
        "no progress for 0.5 min; pending: a (queued, its turn comes after b), b (searching, 3 trials ended), "
        "c (starting its workers)"
    )
    off = Watchdog(0, clock)
    off.look(states, reported)
    clock.now = 10**9
    assert off.look(states, reported) is None


def test_a_stage_takes_its_turn_when_it_fits_beside_the_running_ones():
    totals = {"CPU": 4.0, "GPU": 1.0}
    assert fits_beside({"CPU": 2.0}, [{"CPU": 2.0}], totals)
    assert not fits_beside({"CPU": 2.5}, [{"CPU": 2.0}], totals)
    assert not fits_beside({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 1.0, "GPU": 0.5}], totals)
    assert fits_beside({"CPU": 1.0, "GPU": 0.5}, [{"CPU": 1.0, "GPU": 0.5}], totals)
    assert not fits_beside({"CPU": 1.0, "GPU": 1.0}, [], {"CPU": 8.0})  # no GPU at all
