"""Per-epoch curves as PNG, for what people would rather look at than read (a schedule, learned weights)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

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


def plot_report(results: list, baseline: str | None, title: str, path: Path) -> Path:
    """A job's report (`kdpipe.driver.report.StageResult`s): top-1 per stage as bars with standard-deviation error
    bars (the baseline hatched), and beside them the job's DAG, teachers to the left of their students."""
    figure, (bars, graph) = plt.subplots(1, 2, figsize=(11, 4), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    means = [r.mean("val/top1") or 0.0 for r in results]
    errors = [r.std("val/top1") or 0.0 for r in results]
    drawn = bars.bar(range(len(results)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    for bar, result in zip(drawn, results, strict=True):
        if result.stage == baseline:
            bar.set_hatch("//")
            bar.set_color("tab:gray")
        label = f"n={len(result.seeds)}" if result.seeds else "not run"
        bars.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=7, xytext=(0, 6), textcoords="offset points")  # fmt: skip
    bars.set_xticks(range(len(results)), [r.stage for r in results], rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("val top-1 (mean ± std over seeds)")
    bars.set_ylim(0, min(1.0, max(means + [0.1]) * 1.2))
    bars.grid(axis="y", alpha=0.3)
    depth: dict[str, int] = {}
    for result in results:  # the job file lists teachers before students
        depth[result.stage] = 1 + max((depth.get(t, 0) for t in result.teachers), default=-1)
    rows: dict[int, int] = {}
    where = {}
    for result in results:
        level = depth[result.stage]
        where[result.stage] = (level, -rows.get(level, 0))
        rows[level] = rows.get(level, 0) + 1
    for result in results:
        for teacher in result.teachers:
            graph.annotate("", where[result.stage], where[teacher], arrowprops={"arrowstyle": "->", "color": "0.5"})
    for stage, (x, y) in where.items():
        graph.text(x, y, stage, ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "fc": "white"})
    graph.set_xlim(-0.5, max(depth.values()) + 0.5)
    graph.set_ylim(-max(rows.values()) + 0.5, 0.5)
    graph.axis("off")
    graph.set_title("stages: teacher -> student", fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_confusion(counts, classes: list[str], title: str, path: Path) -> Path:
    """Rows: the true class; columns: the predicted one; each row as a fraction of its images."""
    totals = counts.sum(1, keepdims=True)
    shares = counts / totals.clip(min=1)
    side = min(3 + 0.35 * len(classes), 16)
    figure, axes = plt.subplots(figsize=(side, side), dpi=120)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    if len(classes) <= 40:
        axes.set_xticks(ticks, classes, rotation=90, fontsize=7)
        axes.set_yticks(ticks, classes, fontsize=7)
    if len(classes) <= 12:
        for (row, column), count in np.ndenumerate(counts):
            colour = "white" if shares[row, column] > 0.5 else "black"
            axes.text(column, row, str(count), ha="center", va="center", fontsize=7, color=colour)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_reliability(bins: list[tuple[float, float, int]], ece: float, title: str, path: Path) -> Path:
    """Accuracy against confidence per bin, bars on the diagonal of perfect calibration."""
    width = 1 / len(bins)
    centres = [width * (i + 0.5) for i in range(len(bins))]
    accuracy = [acc if count else 0.0 for _, acc, count in bins]
    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    axes.bar(centres, accuracy, width=width, edgecolor="black", label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title}\nECE {ece:.3f}")
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_tradeoff(results: list, title: str, path: Path) -> Path:
    """Each stage's top-1 against its CPU latency at batch 1 (`kdpipe.driver.report.StageResult`s), an arrow from
    each teacher to its students: how much accuracy each step down in cost gave up."""
    figure, axes = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    where = {}
    for result in results:
        latency, top1 = result.mean("model/latency_ms"), result.mean("val/top1")
        if latency is None or top1 is None or np.isnan(latency):
            continue
        where[result.stage] = (latency, top1)
        axes.scatter([latency], [top1], s=30 + result.mean("model/params") ** 0.5 / 5, alpha=0.8)
        axes.annotate(result.stage, (latency, top1), xytext=(5, 5), textcoords="offset points", fontsize=8)
    for result in results:
        for teacher in result.teachers:
            if result.stage in where and teacher in where:
                arrow = {"arrowstyle": "->", "color": "0.4", "shrinkA": 6, "shrinkB": 6}
                axes.annotate("", where[result.stage], where[teacher], arrowprops=arrow)
    axes.set_xscale("log")
    axes.set_xlabel("CPU latency at batch 1 (ms, log scale)")
    axes.set_ylabel("val top-1")
    axes.set_title(f"{title}: accuracy against latency (marker area: parameters)", fontsize=9)
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
