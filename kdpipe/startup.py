"""A process's start-up with Python's cyclic garbage collector paused.

Importing torch, DeepSpeed, MLflow and Ray makes millions of objects that live as long as the process. In CPython
3.11 every 700 new objects start a collection, and each full one walks all the objects made so far, so a large
share of a stage worker's import, of opening MLflow's SQL store and of `kdpipe run`'s imports goes to collections
that find nothing (`bench/step.py` times the worker's import). Start-up makes almost no cyclic
garbage, so the collector is paused through it; the objects it made are then frozen (moved where later
collections do not walk them, as they would never be freed anyway) and the collector runs again for the work.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block (imports, opening stores) without garbage collections, then freeze what it made."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
