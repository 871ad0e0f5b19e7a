"""What a stage's MLflow run holds, and where: written by the stage's workers, read by the driver to reuse and resume.
(Its MLflow Model, `model`, is MLflow's: logged by the driver, linked to the run, stored with the experiment's
models; `kdpipe.tracking.logged_model`.)

init/                       where its weights started, when they came from elsewhere (`kdpipe.driver.imports`)
weights/                    the stage's final weights (`kdpipe.models.save_weights`): what students learn from
best/                       `result: best`: the weights of the best epoch so far, which become weights/ at the end
peers/<name>/               the same for each network trained beside the student (DML, DCM)
checkpoints/step-N/         full training state (`kdpipe.worker.checkpoint`), the newest `checkpoint.keep` of them
teachers/probe.safetensors  each teacher's outputs on a fixed held-out batch, as this stage loaded it
plots/<method>.png          the method's per-epoch values
"""

from __future__ import annotations

from kdpipe.models import WEIGHTS_FILE
from kdpipe.tracking.files import RunArtifacts
from kdpipe.worker.checkpoint import POSITION

WEIGHTS, PEERS, CHECKPOINTS, TEACHERS, PLOTS, INIT = "weights", "peers", "checkpoints", "teachers", "plots", "init"
BEST = "best"
PROBE_FILE = "probe.safetensors"
SEARCH_BEST = "search/best.json"
FINAL_WEIGHTS = f"{WEIGHTS}/{WEIGHTS_FILE}"  # a stage run with this file is a result students can learn from
INIT_WEIGHTS = f"{INIT}/{WEIGHTS_FILE}"


def weights_folder(peer: str = "") -> str:
    """The stage's own weights, or (`peer`) those of a network trained beside its student."""
    return f"{PEERS}/{peer}" if peer else WEIGHTS


def checkpoint_folder(name: str) -> str:
    return f"{CHECKPOINTS}/{name}"


def stored_checkpoints(files: RunArtifacts) -> list[str]:
    """Names of the run's complete checkpoints (rank 0 stores the position file last), oldest first."""
    return sorted(files.folders_holding(CHECKPOINTS, POSITION))


def prune_checkpoints(files: RunArtifacts, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (and any broken upload older than them)."""
    kept = stored_checkpoints(files)[-keep:]
    stale = [name for name in files.list_folder(CHECKPOINTS) if kept and name < kept[0]]
    if stale:
        files.delete([checkpoint_folder(name) for name in stale])
