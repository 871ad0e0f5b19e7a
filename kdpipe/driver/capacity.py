"""What a Ray cluster can hold, asked before anything waits on it: whether the cluster named by RAY_ADDRESS
answers at all, and whether a stage's workers can ever fit on a cluster that cannot grow; and, for workers that
waited past their deadline, the line that says what they asked and what the cluster held.

A Ray Train run waits for its placement group as long as it takes, which is right where the cluster can grow or
other stages hold what it needs, and wrong where nothing will ever free or add enough: there it would wait without
a word. A cluster that does not answer would keep `ray.init` retrying for minutes.
"""

from __future__ import annotations

import math
import socket

from kdpipe.errors import UserError
from kdpipe.job.spec import WorkersSpec

ANSWER_SECONDS = 5.0  # how long the cluster named by RAY_ADDRESS has to accept a connection


class WorkersCannotFit(Exception):
    """A stage's workers can never be placed on this cluster."""


class WorkersNotPlaced(Exception):
    """A stage's workers were not placed within their deadline."""


def check_answers(address: str) -> None:
    """A one-line `UserError` unless something accepts connections at RAY_ADDRESS's host and port (`auto`, the
    cluster Ray last recorded on this machine, is left to Ray)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"RAY_ADDRESS: expected HOST:PORT or ray://HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ANSWER_SECONDS).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise UserError(
            f"RAY_ADDRESS: no Ray cluster answers at {address} ({reason} within {ANSWER_SECONDS:.0f} s); start it, "
            "or unset RAY_ADDRESS to run on a local Ray"
        ) from None


def per_worker(workers: WorkersSpec) -> dict[str, float]:
    """The resources one worker asks for, as Ray Train's placement group bundle."""
    return {"CPU": workers.cpus, **({"GPU": workers.gpus} if workers.gpus else {})}


def workers_per_node(bundle: dict[str, float], node: dict[str, float]) -> int:
    return min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items() if amount > 0)


def fits(workers: WorkersSpec, nodes: list[dict[str, float]]) -> bool:
    """Whether the workers' bundles can all be placed on nodes of these total resources, as their placement
    strategy requires: STRICT_PACK on one node, STRICT_SPREAD each on its own, PACK and SPREAD anywhere."""
    bundle, count = per_worker(workers), workers.count
    on_each = [workers_per_node(bundle, node) for node in nodes]
    if workers.placement == "STRICT_PACK":
        return any(n >= count for n in on_each)
    if workers.placement == "STRICT_SPREAD":
        return sum(n >= 1 for n in on_each) >= count
    return sum(on_each) >= count


def asked(workers: WorkersSpec) -> str:
    each = ", ".join(f"{amount:g} {name}" for name, amount in per_worker(workers).items())
    return f"{workers.count} workers of {each} each ({workers.placement})"


def held(totals: dict[str, float], nodes: int, free: dict[str, float] | None = None) -> str:
    """What a cluster holds, in CPUs and GPUs (and how much of it is free)."""
    parts = []
    for name in ("CPU", "GPU"):
        if totals.get(name) or name == "CPU":
            part = f"{totals.get(name, 0.0):g} {name}"
            parts.append(part if free is None else f"{part} ({free.get(name, 0.0):g} free)")
    return f"{', '.join(parts)} on {nodes} node(s)"


def check_fits(workers: WorkersSpec, nodes: list[dict[str, float]]) -> None:
    """Raise `WorkersCannotFit`, in one line naming what was asked and what the cluster has, if the workers can
    never be placed on these nodes."""
    if fits(workers, nodes):
        return
    totals = {name: sum(node.get(name, 0.0) for node in nodes) for name in ("CPU", "GPU")}
    raise WorkersCannotFit(
        f"workers: {asked(workers)} can never fit on this Ray cluster, which holds {held(totals, len(nodes))} and "
        "cannot grow; lower workers.count or its resources, or join a larger cluster (RAY_ADDRESS)"
    )


def not_placed(workers: WorkersSpec, seconds: float) -> WorkersNotPlaced:
    """The one-line failure of workers that were not placed in time, with what the cluster holds now."""
    import ray

    holds = held(ray.cluster_resources(), len(cluster_nodes()), ray.available_resources())
    return WorkersNotPlaced(
        f"workers: {asked(workers)} were not placed within {seconds:g} s; the Ray cluster holds {holds}; raise "
        "workers.start_timeout, ask for less, or free the cluster"
    )


def cluster_nodes() -> list[dict[str, float]]:
    """Each living node's total resources."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]
