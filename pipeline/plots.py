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


Trial = tuple[str, list[tuple[int, float]], bool, dict]  # name, (epoch, metric) history, pruned, searched values


def plot_search_epochs(trials: list[Trial], metric: str, title: str, path: Path) -> Path:
    """Every trial's metric per epoch: completed trials solid, pruned ones dashed and ending in an x where the
    scheduler stopped them."""
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, points, pruned, _ in trials:
        epochs, ys = zip(*sorted(points), strict=True)
        xs = [e + 1 for e in epochs]
        line = axes.plot(xs, ys, "--" if pruned else "-", marker="o", markersize=3, label=name)[0]
        if pruned:
            axes.plot(xs[-1], ys[-1], "x", color=line.get_color(), markersize=9)
    axes.set_xlabel("epoch")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel(metric)
    axes.set_title(f"{title}: trials (dashed, x: pruned)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_search_values(trials: list[Trial], metric: str, title: str, path: Path) -> Path:
    """The metric each trial reached (its last epoch) against each searched value: one panel per value, pruned
    trials hollow, log x axes for values spread over more than 100x."""
    names = sorted({name for _, _, _, values in trials for name in values})
    figure, panels = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), dpi=120, squeeze=False)
    for axes, name in zip(panels[0], names, strict=True):
        for _, points, pruned, values in trials:
            x, y = values[name], sorted(points)[-1][1]
            axes.scatter(
                [str(x)] if isinstance(x, str | list | bool) else [x],
                [y],
                facecolors="none" if pruned else "C0",
                edgecolors="C0",
            )
        numbers = [v[name] for _, _, _, v in trials if isinstance(v[name], int | float) and v[name] > 0]
        if numbers and max(numbers) / min(numbers) > 100:
            axes.set_xscale("log")
        axes.set_xlabel(name)
        axes.grid(alpha=0.3)
    panels[0][0].set_ylabel(metric)
    figure.suptitle(f"{title}: {metric} by searched value (hollow: pruned)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
