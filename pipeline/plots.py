"""Per-epoch curves as PNG, for what people would rather look at than read (a schedule, learned weights)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: workers have no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_per_epoch(history: dict[str, list[tuple[int, float]]], title: str, path: Path) -> Path:
    """One line per series, epochs (from 1) on x, a log y axis when the values span more than 100x."""
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=120)
    values = []
    for name, points in sorted(history.items()):
        epochs, ys = zip(*sorted(points), strict=True) if points else ((), ())
        axes.plot([e + 1 for e in epochs], ys, marker="o", markersize=3, label=name.split("/")[-1])
        values += [y for y in ys if y > 0]
    if values and max(values) / min(values) > 100:
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
