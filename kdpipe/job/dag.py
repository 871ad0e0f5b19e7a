"""Stages and their teachers as a graph: ordering, cycle detection and fingerprints."""

from __future__ import annotations

import hashlib
import json
from graphlib import CycleError, TopologicalSorter

from kdpipe.errors import UserError
from kdpipe.job.spec import StageSpec


def topological_order(stages: list[StageSpec]) -> list[str]:
    """Stage names so that every teacher comes before its students; names the field of any bad edge."""
    index: dict[str, int] = {}
    for i, stage in enumerate(stages):
        if stage.name in index:
            raise UserError(
                f"stages[{i}].name: duplicate stage name '{stage.name}' (first at stages[{index[stage.name]}])"
            )
        index[stage.name] = i
    for i, stage in enumerate(stages):
        for teacher in stage.teachers:
            if teacher not in index:
                known = ", ".join(index)
                raise UserError(f"stages[{i}].teachers: unknown stage '{teacher}'; expected one of: {known}")
    sorter = TopologicalSorter({stage.name: stage.teachers for stage in stages})
    try:
        sorter.prepare()
    except CycleError as err:
        cycle = " -> ".join(err.args[1])
        raise UserError(f"stages: teachers form a cycle: {cycle}") from None
    order: list[str] = []
    while sorter.is_active():  # among stages that are ready together, keep the job file's order
        ready = sorted(sorter.get_ready(), key=index.__getitem__)
        order += ready
        sorter.done(*ready)
    return order


def fingerprint(config: dict, upstream: list[str], data_id: str) -> str:
    """Identity of a stage's result: what it learns from (`PlannedStage.identity`), its teachers' fingerprints and
    the data's content identity.

    Canonical JSON (sorted keys) makes key order and YAML formatting irrelevant; anything upstream that changes
    changes this value, and so every fingerprint downstream of it.
    """
    blob = json.dumps({"config": config, "upstream": upstream, "data": data_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
