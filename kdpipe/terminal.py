"""Progress bars for long local work (writing images, shards, checks), drawn only on a terminal: in a log or a
pipe a transient bar would leave nothing but blank lines."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import Progress, track

T = TypeVar("T")


def on_terminal() -> bool:
    return Console().is_terminal


def progress_bar() -> Progress:
    return Progress(transient=True, disable=not on_terminal())


def tracked(items: Iterable[T], description: str) -> Iterator[T]:
    return iter(track(items, description=description, transient=True, disable=not on_terminal()))
