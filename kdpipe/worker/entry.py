"""The functions Ray runs for a stage: the driver names them only, and Ray pickles them by reference, so the driver
never imports the training stack (DeepSpeed, torchvision, the readers: seconds of imports) that only workers need.
"""

from __future__ import annotations

from kdpipe.startup import collector_paused
from kdpipe.worker.task import StageTask


def run_stage(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: the stage's loop, imported in the worker."""
    with collector_paused():  # the training stack: most of what a stage adds to Ray Train's own start
        from kdpipe.worker.stage import stage_loop
    stage_loop(config["task"])


def fill_cache(task: StageTask, rank: int, world: int) -> dict[str, float]:
    """A Ray task: fill the teacher-output cache for one rank's views of the stage (`kdpipe.worker.stage`)."""
    with collector_paused():
        from kdpipe.worker.stage import fill_teacher_cache
    return fill_teacher_cache(task, rank, world)
