"""The job's tracking store, opened once per driver in a named Ray actor, for every stage's rank 0.

Opening a SQL tracking store imports MLflow's SQL store (SQLAlchemy, alembic): a second or so of CPU, which rank 0
of every stage and trial paid at its start while the other ranks waited for it. The driver opens this actor when
it starts Ray, so the store opens once, beside the first stage's own start; rank 0 then logs its metrics and tags
through it, each call waited for, so a failure (an MLflow outage) reaches rank 0 as a `TrackingError` as before.
The actor lives on the driver's node, where the store is known to be reachable (a SQLite file is there), and Ray
starts it again if it dies, for the stage's next attempt.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kdpipe.startup import collector_paused
from kdpipe.tracking import TrackingError

# MLflow bounds one request (MLFLOW_HTTP_REQUEST_TIMEOUT, 120 s) and retries it with backoff a few times: a call
# to the actor that takes longer than this is not coming back.
ACTOR_SECONDS = 900.0


@ray.remote(num_cpus=0, max_concurrency=8)  # stages log side by side: one slow call holds up no other stage
class TrackingActor:
    def __init__(self, uri: str):
        with collector_paused():  # MLflow's import, and its SQL store's (SQLAlchemy, alembic) as it opens
            from kdpipe.tracking.store import Tracker

            self.tracker = Tracker(uri)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(run_id, metrics, step)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.tracker.set_tags(run_id, tags)

    def metric_history(self, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        return self.tracker.metric_history(run_id, keys)


def actor_name(job: str) -> str:
    return f"kdpipe-tracking-{job}"  # in the driver's own Ray namespace: another driver has its own


def open_tracking_actor(job: str, uri: str) -> ray.actor.ActorHandle:
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"name": actor_name(job), "get_if_exists": True, "max_restarts": -1, "scheduling_strategy": here}
    return TrackingActor.options(**options).remote(uri)


def result(call: ray.ObjectRef):
    """A call's result; its failure as the actor raised it (a one-line `TrackingError`), not Ray's wrapper. An
    actor that does not answer within MLflow's own bound on a request and its retries is an outage too."""
    try:
        return ray.get(call, timeout=ACTOR_SECONDS)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None
    except ray.exceptions.GetTimeoutError:
        raise TrackingError(f"the job's tracking actor did not answer within {ACTOR_SECONDS:.0f} s") from None


class ActorTracker:
    """What rank 0 logs through: the `Tracker` calls a stage makes, sent to the job's tracking actor."""

    def __init__(self, job: str):
        self.actor = ray.get_actor(actor_name(job))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        result(self.actor.log_metrics.remote(run_id, metrics, step))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        result(self.actor.set_tags.remote(run_id, tags))

    def metric_history(self, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        return result(self.actor.metric_history.remote(run_id, keys))
