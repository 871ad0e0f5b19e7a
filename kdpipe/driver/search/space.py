"""A search's space as Ray Tune distributions, and a trial's sampled values by their paths in the stage."""

from __future__ import annotations

from typing import Any

from ray import tune

from kdpipe.job.spec import Dimension, SearchSpec


def tune_space(search: SearchSpec) -> dict[str, Any]:
    """The space as Tune distributions, under plain keys `p0, p1, ...` (dotted paths mean nesting to Tune)."""
    return {f"p{i}": tune_distribution(dimension) for i, dimension in enumerate(search.space.values())}


def tune_distribution(dimension: Dimension) -> Any:
    low, high = dimension.low, dimension.high
    if dimension.distribution == "choice":
        return tune.choice(dimension.values)
    if dimension.distribution == "int":
        return tune.randint(int(low), int(high) + 1)  # randint's upper bound is excluded
    return tune.loguniform(low, high) if dimension.distribution == "loguniform" else tune.uniform(low, high)


def values_of(config: dict, search: SearchSpec) -> dict[str, Any]:
    """A trial's sampled values by their paths in the stage."""
    return {path: config[f"p{i}"] for i, path in enumerate(search.space)}
