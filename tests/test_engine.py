"""The training engine in one process (a gloo group of one, no Ray, no MLflow): the learning rate at a position,
one step against plain autograd, the epoch loop's sums and schedule, evaluation counted by hand, resuming
mid-epoch, and bf16 on CPU. Each test runs in a second or two."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdpipe.data.shard_reader import to_device
from kdpipe.job.spec import ScheduleSpec, StageSpec
from kdpipe.methods import METHODS
from kdpipe.models import build_model
from kdpipe.worker.checkpoint import MODEL, Position, read_state, write_state
from kdpipe.worker.engine import Engine, compiling_nothing, evaluate, lr_factor

CLASSES, SIZE, BATCH = 4, 8, 32


class Blobs:
    """A learnable toy task behind the engine's data interface: each class a fixed random image plus noise; every
    epoch's order is drawn from the epoch, as kdpipe's readers do."""

    num_classes, skipped = CLASSES, 0

    def __init__(self, count: int = 256, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        means = torch.randn(CLASSES, 3, SIZE, SIZE, generator=generator)
        labels = torch.arange(count + 64) % CLASSES
        images = means[labels] + 0.8 * torch.randn(len(labels), 3, SIZE, SIZE, generator=generator)
        self.x, self.y, self.val_x, self.val_y = images[:count], labels[:count], images[count:], labels[count:]

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.y) // BATCH

    def train_batches(self, epoch: int, start: int = 0):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(epoch))
        for step in range(start, self.steps_per_epoch(epoch)):
            index = order[step * BATCH : (step + 1) * BATCH]
            yield self.x[index], self.y[index]

    def val_batches(self):
        return zip(self.val_x.split(BATCH), self.val_y.split(BATCH), strict=True)

    inputs = staticmethod(to_device)


class Recorder:
    """Checkpoint sink, epoch log and progress reporter at once: keeps what the engine handed over, and writes real
    checkpoint folders every `every` steps when given a folder."""

    def __init__(self, folder: Path | None = None, every: int = 0):
        self.folder, self.every = folder, every
        self.engine: Engine | None = None
        self.saved: list[Position] = []
        self.epochs: list[dict[str, float]] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def due(self, global_step: int) -> bool:
        return bool(self.every) and global_step % self.every == 0

    def save(self, position: Position, metrics: dict[str, float]) -> None:
        self.saved.append(position)
        if self.folder:
            write_state(self.folder / position.name, self.engine.method, self.engine.optimizer, position, rank=0)

    def log_epoch(self, epoch: int, metrics: dict[str, float], method_values: dict[str, float]) -> None:
        self.epochs.append(metrics)

    def step(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> None:
        self.losses.append(float(loss))
        self.lrs.append(self.engine.optimizer.param_groups[0]["lr"])

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass


def make_engine(method: str = "ce", seed: int = 0, epochs: int = 2, **stage) -> Engine:
    torch.manual_seed(seed)
    spec = StageSpec(name="s", model="resnet8", method=method, epochs=epochs, optimizer={"lr": 0.1}, **stage)
    cls = METHODS[method]
    method_module = cls(build_model("resnet8", CLASSES), [], cls.Params(), model="resnet8", num_classes=CLASSES)
    return Engine(method_module, spec, BATCH, torch.device("cpu"))


def train(engine: Engine, data: Blobs, recorder: Recorder, start: Position | None = None) -> Position:
    recorder.engine = engine
    return engine.train(data, start or Position(0, 0, 0), recorder, recorder, recorder)


def test_the_learning_rate_is_a_function_of_the_position():
    cosine, step = ScheduleSpec(name="cosine"), ScheduleSpec(name="step", milestones=[3, 6], gamma=0.1)
    assert lr_factor(cosine, 0, 10) == 1.0 and lr_factor(cosine, 5, 10) == pytest.approx(0.5)
    assert lr_factor(cosine, 2.5, 10) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))  # cos(pi / 4)
    assert lr_factor(cosine, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(step, e, 9) for e in (2.99, 3, 6.5)] == pytest.approx([1.0, 0.1, 0.01])
    warm = ScheduleSpec(name="constant", warmup_epochs=2)
    assert [lr_factor(warm, e, 9) for e in (0.5, 1, 3)] == [0.25, 0.5, 1.0]
    warm_cosine = ScheduleSpec(name="cosine", warmup_epochs=1)
    assert lr_factor(warm_cosine, 0.5, 4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 8)))


def test_a_step_is_one_sgd_step_on_the_summed_losses(process_group):
    """Against plain autograd on a copy of the same model: SGD at lr 0.1 (momentum's first step is the gradient;
    weight decay 5e-4 added to it), the returned loss the batch's cross-entropy."""
    engine = make_engine()
    reference = copy.deepcopy(engine.method.student).train()
    images, labels = next(Blobs().train_batches(0))
    loss = F.cross_entropy(reference(images.contiguous(memory_format=torch.channels_last)), labels)
    loss.backward()
    losses = engine.step(to_device(images, engine.device), labels)
    assert losses["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["ce"].item())
    for (name, param), before in zip(engine.method.student.named_parameters(), reference.parameters(), strict=True):
        expected = before - 0.1 * (before.grad + 5e-4 * before)
        torch.testing.assert_close(param.detach(), expected.detach(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["ce", "dml"])
def test_the_epoch_loop_logs_the_means_of_its_steps_and_the_lr_of_each_step(process_group, method):
    engine, data, recorder = make_engine(method), Blobs(), Recorder()
    end = train(engine, data, recorder)
    steps = data.steps_per_epoch(0)
    assert end == Position(2, 0, 2 * steps) and [p.global_step for p in recorder.saved] == [steps, 2 * steps]
    expected_lrs = [0.1 * lr_factor(ScheduleSpec(), e + s / steps, 2) for e in range(2) for s in range(steps)]
    assert recorder.lrs == pytest.approx(expected_lrs)
    for epoch, metrics in enumerate(recorder.epochs):
        assert metrics["train/loss"] == pytest.approx(sum(recorder.losses[epoch * steps : (epoch + 1) * steps]) / steps)
        assert metrics["lr"] == pytest.approx(0.1 * lr_factor(ScheduleSpec(), epoch + 1, 2))
        assert metrics["global_step"] == (epoch + 1) * steps and metrics["images_per_second"] > 0
    scores = evaluate(engine.method.student, data, engine.device, engine.dtype)
    assert recorder.epochs[-1]["val/top1"] == scores["val/top1"]
    if method == "dml":
        assert "val/peer1/top1" in recorder.epochs[-1] and "train/kl_peer1" in recorder.epochs[-1]


def test_evaluation_counts_top1_and_top5_as_by_hand(process_group):
    """Four images whose "logits" are their pixels: ranks of the true class 1, 2, 6 and 5 out of 6 classes."""
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5], [1, 9.0, 8, 3, 4, 5], [1, 2, 3, 4, 5, 0], [6, 2, 3, 4, 5, 1]]).view(
        4, 6, 1, 1
    )
    labels = torch.tensor([0, 2, 5, 1])
    data = SimpleNamespace(val_batches=lambda: [(logits, labels)], inputs=lambda images, device: images, num_classes=6)
    scores = evaluate(torch.nn.Flatten(), data, torch.device("cpu"), torch.float32)
    assert scores == {"val/top1": 0.25, "val/top5": 0.75}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_resuming_mid_epoch_ends_where_an_uninterrupted_run_ends(process_group, tmp_path, zero_stage):
    """Train two epochs, saving every 3 steps; then a fresh engine (other initial weights) loads the checkpoint
    taken inside epoch 1 and trains on: same weights, same epoch-1 losses as the uninterrupted run."""
    data = Blobs()
    whole = Recorder(tmp_path, every=3)
    train(make_engine(deepspeed={"zero_stage": zero_stage}), data, whole)
    mid = next(p for p in whole.saved if p.epoch == 1 and p.step > 0)  # step 1 of epoch 1: global step 9

    resumed_engine = make_engine(seed=1, deepspeed={"zero_stage": zero_stage})
    start = read_state(tmp_path / mid.name, resumed_engine.method, resumed_engine.optimizer, 0, torch.device("cpu"))
    assert start == mid
    resumed = Recorder()
    end = train(resumed_engine, data, resumed, start)

    assert end == whole.saved[-1] and len(resumed.epochs) == 1
    assert resumed.epochs[0]["train/loss"] == pytest.approx(whole.epochs[1]["train/loss"], rel=1e-6)
    uninterrupted = load_file(str(tmp_path / end.name / MODEL))
    for name, value in resumed_engine.method.state_dict().items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-6, atol=1e-7, msg=name)


def test_an_engine_takes_no_precision_from_the_engine_built_before_it(process_group):
    """A ZeRO optimizer scales the loss when its engine is fp16 (autocast), and only then: DeepSpeed keeps the last
    engine's autocast setting in module globals, so an fp32 engine built after an fp16 one in the same process (a
    test session, a bench of both precisions) would scale its loss too."""
    fp16 = make_engine(deepspeed={"precision": "fp16", "zero_stage": 2}, workers={"gpus": 1})
    assert fp16.optimizer.torch_autocast_gradscaler is not None
    fp32 = make_engine(deepspeed={"zero_stage": 2})
    assert fp32.optimizer.torch_autocast_gradscaler is None


def test_inside_compiling_nothing_torch_compile_hands_functions_back_and_the_setting_is_restored(monkeypatch):
    """What DeepSpeed's import-time decorators of its Muon kernels get while `Engine` builds its DeepSpeed engine
    (no inductor import, 1-2 s per process); after the block, the setting is what it was."""

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return x

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    with compiling_nothing():
        assert torch.compile(kernel) is kernel
    assert "TORCHDYNAMO_DISABLE" not in os.environ
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    with compiling_nothing():
        assert torch.compile(kernel) is kernel
    assert os.environ["TORCHDYNAMO_DISABLE"] == "0"


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_trains_on_cpu_with_finite_losses_and_learns(process_group, zero_stage):
    """bf16 is autocast: convolutions compute in bf16, weights, BatchNorm and the optimizer stay fp32."""
    engine = make_engine(epochs=3, deepspeed={"precision": "bf16", "zero_stage": zero_stage})
    data, recorder = Blobs(), Recorder()
    images, labels = next(data.train_batches(0))
    logits, _ = engine.ds(to_device(images, engine.device), labels)
    assert logits.dtype == torch.bfloat16
    train(engine, data, recorder)
    assert {p.dtype for p in engine.method.parameters()} == {torch.float32}
    assert {b.dtype for b in engine.method.buffers() if b.is_floating_point()} == {torch.float32}
    assert all(math.isfinite(loss) for loss in recorder.losses)
    assert recorder.epochs[-1]["train/loss"] < recorder.epochs[0]["train/loss"]
    assert recorder.epochs[-1]["val/top1"] > 0.6  # 4 classes: chance is 0.25
