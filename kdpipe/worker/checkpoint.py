"""A stage's full training state as one folder: everything it needs to go on exactly where it stopped.

    position.json      epoch in progress, steps done in it, global step, rank 0's running loss sums   (rank 0)
    model.safetensors  the method module's state: the student and any trainable extras               (rank 0)
    rank-<r>.pt        each rank's optimizer state (its ZeRO partition), fp32 master weights, RNG state

Every file holds tensors, numbers and strings only, so `torch.load(weights_only=True)` reads it: no pickled
objects. The learning rate needs no state (it is a function of progress) and the data order needs none either
(each epoch's order is a function of the seed and the epoch), so a position is enough to continue mid-epoch.

The same folder goes to Ray Train (worker restarts within a run) and to the stage's MLflow run (a later
`kdpipe run`, on any machine).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from kdpipe.job.spec import CheckpointSpec

POSITION, MODEL = "position.json", "model.safetensors"  # the position file marks a checkpoint complete
CLOCK_CHECK_STEPS = 10  # how often ranks agree on whether a time-based checkpoint is due (a small collective)
# ZeRO stages 1-2 keep the fp32 master copy of this rank's parameter partition outside the model.
MASTER_WEIGHTS = "single_partition_of_fp32_groups"


@dataclass(frozen=True)
class Position:
    epoch: int  # the epoch in progress (== epochs once training is over)
    step: int  # optimizer steps already done within it
    global_step: int
    sums: dict[str, float] = field(default_factory=dict)  # the epoch's running training-loss sums so far

    @property
    def name(self) -> str:
        """Checkpoint names sort in training order."""
        return f"step-{self.global_step:09d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself: DeepSpeed's ZeRO and mixed-precision wrappers hold it as `.optimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def write_state(folder: Path, module: nn.Module, optimizer, position: Position, rank: int) -> list[Path]:
    """This rank's part of a checkpoint; returns the files it wrote (rank 0's position file last)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "optimizer": base_optimizer(optimizer).state_dict(),
        "masters": [t.detach().clone() for t in getattr(optimizer, MASTER_WEIGHTS, [])],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8),
    }
    torch.save(state, folder / rank_file(rank))
    written = [folder / rank_file(rank)]
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(folder / MODEL))
        (folder / POSITION).write_text(json.dumps(asdict(position)))
        written += [folder / MODEL, folder / POSITION]
    return written


def read_position(folder: Path) -> Position:
    return Position(**json.loads((folder / POSITION).read_text()))


def read_state(folder: Path, module: nn.Module, optimizer, rank: int, device: torch.device) -> Position:
    """Load a checkpoint written by the same number of ranks into a freshly built engine."""
    module.load_state_dict(load_file(str(folder / MODEL), device=str(device)))
    path = folder / rank_file(rank)
    state = torch.load(path, map_location=device, weights_only=True)
    base_optimizer(optimizer).load_state_dict(state["optimizer"])
    if hasattr(optimizer, "refresh_fp32_params"):  # mixed-precision master weights from the loaded model...
        optimizer.refresh_fp32_params()
    for current, saved in zip(getattr(optimizer, MASTER_WEIGHTS, []), state["masters"], strict=True):
        current.data.copy_(saved)  # ...or, under ZeRO, the exact fp32 masters that were saved
    torch.set_rng_state(state["rng"].cpu())
    if torch.cuda.is_available() and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"].cpu())
    return read_position(folder)


class CheckpointClock:
    """When the next mid-epoch checkpoint is due, decided the same way on every rank (all of them must save)."""

    def __init__(self, spec: CheckpointSpec, global_step: int, device: torch.device):
        self.spec, self.device = spec, device
        self.saved(global_step)

    def saved(self, global_step: int) -> None:
        self.last_step, self.last_time = global_step, time.monotonic()

    def due(self, global_step: int) -> bool:
        if self.spec.every_steps and global_step - self.last_step >= self.spec.every_steps:
            return True
        if not self.spec.every_minutes or global_step % CLOCK_CHECK_STEPS:
            return False
        # Ranks' clocks differ; rank 0's decides, at a step every rank reaches.
        late = time.monotonic() - self.last_time >= 60 * self.spec.every_minutes
        flag = torch.tensor([int(late)], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(flag, 0)
        return bool(flag.item())
