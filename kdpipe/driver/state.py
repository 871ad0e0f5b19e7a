"""The states a stage (or a search's trial) is shown in: by `kdpipe run` as it goes, by `kdpipe status` from what
MLflow holds."""

from enum import StrEnum


class StageState(StrEnum):
    PENDING = "pending"  # not started; for `status`: never trained
    WAITING = "waiting"  # another kdpipe driver trains it
    RUNNING = "running"
    DONE = "done"
    REUSED = "reused"  # a finished run of the same fingerprint, trained earlier
    FAILED = "failed"
    SKIPPED = "skipped"  # a teacher did not finish
    OUTDATED = "outdated"  # `status`: trained, with an older fingerprint
    INTERRUPTED = "interrupted"  # `status`: its driver is gone; the next run resumes it
    PRUNED = "pruned"  # `status`: a trial the search's scheduler stopped

    @property
    def finished(self) -> bool:
        """Its final weights exist: trained now, or found in MLflow from an earlier run."""
        return self in (StageState.DONE, StageState.REUSED)

    @property
    def ended(self) -> bool:
        return self in (StageState.DONE, StageState.REUSED, StageState.FAILED, StageState.SKIPPED)
