"""The checkpoint folder and the clock that decides when to write one, in one process (a gloo group of 1)."""

from __future__ import annotations

import time

import torch

from kdpipe.job.spec import CheckpointSpec
from kdpipe.worker.checkpoint import (
    CLOCK_CHECK_STEPS,
    MODEL,
    POSITION,
    CheckpointClock,
    Position,
    rank_file,
    read_state,
    write_state,
)


def trained_pair(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def test_a_checkpoint_restores_model_optimizer_rng_and_position(tmp_path):
    model, optimizer = trained_pair(0)
    position = Position(2, 5, 21, {"loss": 3.5})
    files = write_state(tmp_path, model, optimizer, position, rank=0)
    assert [f.name for f in files] == [rank_file(0), MODEL, POSITION]  # the position file, the marker, last
    expected_draw = torch.rand(3)  # what the RNG gives next, right after the save

    fresh, fresh_optimizer = trained_pair(1)
    assert read_state(tmp_path, fresh, fresh_optimizer, rank=0, device=torch.device("cpu")) == position
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["momentum_buffer"], loaded[i]["momentum_buffer"]) for i in saved)
    assert torch.equal(torch.rand(3), expected_draw)
    assert Position(0, 0, 1234).name == "step-000001234" and Position(0, 0, 99).name < Position(0, 0, 100).name


def test_the_clock_counts_steps_and_minutes(process_group):
    by_steps = CheckpointClock(CheckpointSpec(every_steps=3, every_minutes=0), 0, torch.device("cpu"))
    assert [by_steps.due(step) for step in range(1, 5)] == [False, False, True, True]
    by_steps.saved(3)
    assert not by_steps.due(4) and by_steps.due(6)

    by_time = CheckpointClock(CheckpointSpec(every_steps=0, every_minutes=0.001), 0, torch.device("cpu"))
    assert not by_time.due(CLOCK_CHECK_STEPS)  # 0.06 s have not passed yet
    time.sleep(0.1)
    assert not by_time.due(CLOCK_CHECK_STEPS + 1)  # ranks only compare clocks every CLOCK_CHECK_STEPS steps
    assert by_time.due(2 * CLOCK_CHECK_STEPS)
