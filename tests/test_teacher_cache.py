"""Issue 15: the teacher-output cache in one process (the engine in a gloo group of one, real files on disk).

A KD student trained three times on the same batches and seed: with the online teacher, with a cold cache and with
the warm cache it left. The cached runs train identically to each other and, up to fp16 rounding of the teacher's
logits, like the online run; the warm run never calls the teacher. Then what must never be served: steps whose
images differ from the cached views, and half-written, corrupt or foreign files (each named in one line and
rebuilt). What a stage, a rerun and a search do with the cache through Ray: test_pipeline and test_search.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdpipe.job.cache_policy import cache_key
from kdpipe.job.spec import StageSpec
from kdpipe.methods import METHODS
from kdpipe.models import build_model
from kdpipe.worker.checkpoint import Position
from kdpipe.worker.engine import Engine, evaluate
from kdpipe.worker.teacher_cache import CachedTeacher, Exact, TeacherCache, TeacherCaches, TopK
from tests.test_engine import BATCH, CLASSES, Blobs, Recorder, make_engine, train

EPOCHS = 2


@pytest.fixture(scope="module")
def teacher(process_group) -> torch.nn.Module:
    """A resnet8 trained from labels for 2 epochs on the blobs: a teacher worth distilling from."""
    engine = make_engine(epochs=2)
    train(engine, Blobs(), Recorder())
    return engine.method.student.eval().requires_grad_(False)


class Counted(torch.nn.Module):
    """A teacher that counts its forward calls."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher, self.calls = copy.deepcopy(teacher), 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.teacher(images)


def distil(
    teacher: torch.nn.Module,
    data: Blobs,
    root=None,
    key: str = "key",
    encoding=None,
    method: str = "kd",
    params: dict | None = None,
    count: int = 1,
) -> tuple[Recorder, float, int]:
    """A student (resnet8, seed 0) of `count` copies of the teacher, trained by `method` for EPOCHS on `data`:
    online, or through the cache at `root` (one key per teacher). Returns what the engine reported, the student's
    final top-1 and the teachers' forward calls during training."""
    counted = [Counted(teacher) for _ in range(count)]
    teachers: list[torch.nn.Module] = list(counted)
    caches = None
    if root is not None:
        keys = [key] if count == 1 else [f"{key}-{i}" for i in range(count)]
        stores = [TeacherCache(str(root), k, 0, encoding or Exact()) for k in keys]
        teachers = [CachedTeacher(t, store) for t, store in zip(counted, stores, strict=True)]
        caches = TeacherCaches(teachers)
    torch.manual_seed(0)
    names = [f"t{i}" for i in range(count)]
    spec = StageSpec(name="s", model="resnet8", method=method, teachers=names, epochs=EPOCHS, optimizer={"lr": 0.1})
    cls = METHODS[method]
    module = cls(build_model("resnet8", CLASSES), teachers, cls.Params(**(params or {})), num_classes=CLASSES)
    engine, recorder = Engine(module, spec, BATCH, torch.device("cpu")), Recorder()
    recorder.engine = engine
    engine.train(data, Position(0, 0, 0), recorder, recorder, recorder, **({"teachers": caches} if caches else {}))
    top1 = evaluate(engine.method.student, data, engine.device, engine.dtype)["val/top1"]
    return recorder, top1, sum(t.calls for t in counted)


def cache_counts(recorder: Recorder) -> list[tuple[float, float]]:
    return [(m["teacher_cache/computed"], m["teacher_cache/read"]) for m in recorder.epochs]


def test_a_warm_cache_trains_like_the_online_teacher_without_calling_it(teacher, tmp_path):
    """Points 1 and 3: same losses per step within fp16 rounding, same top-1, and no teacher forward when warm."""
    data, steps = Blobs(), Blobs().steps_per_epoch(0)
    online, online_top1, online_teacher = distil(teacher, data)
    cold, cold_top1, cold_teacher = distil(teacher, data, tmp_path)
    warm, warm_top1, warm_teacher = distil(teacher, data, tmp_path)

    assert online_teacher == cold_teacher == EPOCHS * steps
    assert warm_teacher == 0
    assert cache_counts(cold) == [(steps, 0)] * EPOCHS and cache_counts(warm) == [(0, steps)] * EPOCHS
    assert sorted(p.name for p in (tmp_path / "key").iterdir()) == [
        "epoch-00000-rank-0000.safetensors",
        "epoch-00001-rank-0000.safetensors",
    ]
    assert warm.losses == cold.losses and warm_top1 == cold_top1  # cold and warm serve the same fp16 logits
    assert warm.losses == pytest.approx(online.losses, rel=1e-3)  # fp16 rounding of the logits (2^-11), and its echo
    assert online.losses != warm.losses  # the cache's values really are rounded: the comparison is not vacuous
    assert abs(warm_top1 - online_top1) <= 0.005


@pytest.mark.parametrize(
    ("method", "params", "count"),
    [("takd", {}, 1), ("dgkd", {"drop_prob": 0.5}, 2), ("adaptive", {"paths": ["st", "logits"]}, 1)],
)
def test_every_method_that_learns_from_logits_alone_reads_the_cache(teacher, tmp_path, method, params, count):
    """TAKD, DGKD with two teachers (each step drops one of them: the cold run fills each teacher's cache only where
    it was kept, which is where the warm run, drawing the same drops, reads it) and adaptive's logit paths."""
    assert METHODS[method].cacheable(METHODS[method].Params(**params))
    data = Blobs()
    online, _, online_calls = distil(teacher, data, method=method, params=params, count=count)
    cold, _, cold_calls = distil(teacher, data, tmp_path, method=method, params=params, count=count)
    warm, _, warm_calls = distil(teacher, data, tmp_path, method=method, params=params, count=count)
    assert online_calls == cold_calls == EPOCHS * data.steps_per_epoch(0) and warm_calls == 0
    # Against the online teachers: adaptive's logit MSE (and its learned weights) magnify fp16 rounding more than KL.
    assert warm.losses == cold.losses and warm.losses == pytest.approx(online.losses, rel=1e-2, abs=1e-3)


def test_feature_methods_keep_their_online_teachers():
    assert not any(METHODS[m].cacheable(METHODS[m].Params()) for m in ("fitnets", "at", "sp", "pkt", "infoflow"))
    assert not METHODS["adaptive"].cacheable(METHODS["adaptive"].Params(paths=["st", "at"]))


def test_steps_whose_images_differ_from_the_cached_views_run_the_teacher(teacher, tmp_path, capsys):
    """A cache filled on one order of the samples, read under the same key by a reader that deals them in another
    order (what a reader changed without a change of key would do): no step is served from the cache; the student
    trains as with the online teacher on that order, and the steps are filled with the new views."""
    distil(teacher, Blobs(), tmp_path)
    shuffled = Blobs(seed=0)
    shuffled.train_batches = lambda epoch, start=0: Blobs.train_batches(shuffled, epoch + 7, start)
    steps = shuffled.steps_per_epoch(0)
    capsys.readouterr()
    changed, _, changed_teacher = distil(teacher, shuffled, tmp_path)
    online, _, _ = distil(teacher, shuffled)
    assert changed_teacher == EPOCHS * steps and cache_counts(changed) == [(steps, 0)] * EPOCHS
    assert changed.losses == pytest.approx(online.losses, rel=1e-3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == EPOCHS and all("differ from the cached views" in line for line in lines), lines
    again, _, again_teacher = distil(teacher, shuffled, tmp_path)
    assert again_teacher == 0 and again.losses == changed.losses


def test_half_written_corrupt_and_foreign_files_are_named_and_rebuilt(teacher, tmp_path, capsys):
    """Point 4: epoch 0's file cut short (as a killed writer on storage without atomic renames would leave it),
    epoch 1's with bytes flipped inside its logits, and a file of another key copied over the first: each is named
    in one line, none is trained on, and each is rebuilt (a third run reads every step)."""
    data, steps = Blobs(), Blobs().steps_per_epoch(0)
    reference, _, _ = distil(teacher, data, tmp_path)
    first, second = (tmp_path / "key" / f"epoch-{e:05d}-rank-0000.safetensors" for e in range(2))
    first.write_bytes(first.read_bytes()[:-1000])
    raw = bytearray(second.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\xff" * 8
    second.write_bytes(bytes(raw))
    capsys.readouterr()
    rebuilt, _, rebuilt_teacher = distil(teacher, data, tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert str(first) in lines[0] and "unreadable" in lines[0] and "rebuilding it" in lines[0]
    assert str(second) in lines[1] and "checksum mismatch" in lines[1]
    assert rebuilt_teacher == EPOCHS * steps and rebuilt.losses == reference.losses

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / first.name).write_bytes(first.read_bytes())
    foreign, _, foreign_teacher = distil(teacher, data, tmp_path, key="other")
    line = capsys.readouterr().err.strip()
    assert "written for {'key': 'key'" in line and str(tmp_path / "other" / first.name) in line
    assert cache_counts(foreign)[0] == (steps, 0)

    warm, _, warm_teacher = distil(teacher, data, tmp_path)
    assert warm_teacher == 0 and warm.losses == reference.losses and not capsys.readouterr().err


def test_top_k_keeps_the_k_largest_probabilities_and_spreads_the_rest_evenly():
    """FKD's soft labels by hand: logits (2, 1, 0, -1), k = 2. The two largest stay; the other two classes get the
    logit log((e^0 + e^-1) / 2), so each has half of the mass the first two leave."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, -2.0, 1.0]])
    encoding = TopK(2, 4)
    decoded = encoding.decode(encoding.encode(logits))
    rest = torch.log(torch.tensor((1 + torch.e**-1) / 2))
    torch.testing.assert_close(decoded[0], torch.tensor([2.0, 1.0, rest, rest]))
    p, q = logits.softmax(1), decoded.softmax(1)
    torch.testing.assert_close(q[1, [1, 3]], p[1, [1, 3]], rtol=1e-3, atol=0)  # fp16 values: 2^-11 relative
    torch.testing.assert_close(q[1, [0, 2]], (1 - p[1, [1, 3]].sum()).expand(2) / 2, rtol=1e-3, atol=0)


def test_a_top_k_cache_trains_alike_cold_and_warm_and_approximates_the_teacher(teacher, tmp_path):
    """Top-2 of 4 classes: a cold and a warm cache train identically, without the teacher when warm; the student
    learns from an approximation (its losses differ from the online teacher's by more than fp16 rounding)."""
    data, encoding = Blobs(), TopK(2, CLASSES)
    online, _, _ = distil(teacher, data)
    cold, _, _ = distil(teacher, data, tmp_path, encoding=encoding)
    warm, warm_top1, warm_teacher = distil(teacher, data, tmp_path, encoding=encoding)
    assert warm_teacher == 0 and warm.losses == cold.losses
    assert warm.losses != pytest.approx(online.losses, rel=1e-3)
    assert warm_top1 > 0.6  # 4 classes: chance is 0.25


def test_the_key_changes_with_every_fact_that_decides_the_outputs():
    facts = [  # (name, value, another value)
        ("teacher_run", "run-a", "run-b"),
        ("data_identity", "data-a", "data-b"),
        ("reading", {"batch_size": 64, "augment": True}, {"batch_size": 32, "augment": True}),
        ("seed", 0, 1),
        ("world", 2, 1),
        ("precision", "fp32", "bf16"),
        ("encoding", "fp16", "top5"),
    ]
    base = {name: value for name, value, _ in facts}
    key = cache_key(**base)
    assert key == cache_key(**dict(base))
    for name, _, other in facts:
        assert cache_key(**{**base, name: other}) != key, name
