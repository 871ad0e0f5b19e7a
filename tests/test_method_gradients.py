"""Every method on real models: gradients reach what should learn (student, connectors, heads, peers, the
adaptive weights) and never a frozen teacher; heterogeneous pairs (a ResNet teacher, a MobileNetV3 student) work
through feature paths; peers' saved networks are the plain models."""

from __future__ import annotations

import pytest
import torch

from kdpipe.methods import METHODS
from kdpipe.models import build_model

CLASSES, SIZE = 10, 32
TEACHERS = {"dgkd": 2, "dml": 0, "dcm": 0}  # how many teachers each method is given here (default 1)


def run_method(name: str, student: str, teacher: str, params: dict | None = None, teachers: int | None = None):
    torch.manual_seed(0)
    method_cls = METHODS[name]
    count = TEACHERS.get(name, 1) if teachers is None else teachers
    frozen = [build_model(teacher, CLASSES).eval().requires_grad_(False) for _ in range(count)]
    method = method_cls(
        build_model(student, CLASSES),
        frozen,
        method_cls.Params.model_validate(params or {}),
        model=student,
        num_classes=CLASSES,
        image_size=SIZE,
    ).train()
    images, labels = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    logits, losses = method(images, labels)
    assert logits.shape == (4, CLASSES)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    return method, frozen, losses


def learns(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters()]
    return (
        bool(grads)
        and all(g is not None for g in grads[-2:])
        and any(g.abs().sum() > 0 for g in grads if g is not None)
    )


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"ce"}))
def test_gradients_reach_the_learners_and_never_a_teacher(name):
    method, teachers, losses = run_method(name, "resnet8", "resnet14")
    assert learns(method.student), "the student got no gradient"
    for teacher in teachers:
        assert all(p.grad is None for p in teacher.parameters()), "a frozen teacher got a gradient"
    for peer, (_, network) in method.peers().items():
        assert learns(network), f"{peer} got no gradient"
    trainable_extras = [m for n, m in method.named_children() if n not in ("student", "others", "peer")]
    for extra in filter(lambda m: any(True for _ in m.parameters()), trainable_extras):
        assert learns(extra), f"{type(extra).__name__} got no gradient"
    if name == "adaptive":
        assert method.log_vars.grad is not None and method.log_vars.grad.abs().sum() > 0


def test_each_peers_mutual_term_moves_only_that_peer():
    """DML: peer 1's KL term moves peer 1 alone (peer 2's prediction is its target), and the other way round."""
    method = METHODS["dml"](
        build_model("resnet8", CLASSES), [], METHODS["dml"].Params(), model="resnet8", num_classes=CLASSES
    ).train()
    for term, learner, target in (("kl", method.student, method.others), ("kl_peer1", method.others, method.student)):
        method.zero_grad(set_to_none=True)
        _, losses = method(torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,)))
        losses[term].backward()
        assert learns(learner) and all(p.grad is None for p in target.parameters())


def test_fitnets_two_stages_hints_first_then_the_whole_student():
    method, teachers, losses = run_method("fitnets", "mobilenet_v3_small", "resnet18", {"hint_epochs": 1})
    assert set(losses) == {"hint"}
    classifier = list(method.student.classifier.parameters())
    assert all(p.grad is None for p in classifier)  # stage 1 trains the student up to the guided layer only
    assert method.student.features[0][0].weight.grad.abs().sum() > 0 and learns(method.regressor)
    method.zero_grad(set_to_none=True)
    method.set_epoch(1)
    _, losses = method(torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,)))
    assert set(losses) == {"ce"}  # stage 2: the labels (and KD if kd_weight > 0), no hint
    sum(losses.values()).backward()
    assert learns(method.student) and all(p.grad is None for p in method.regressor.parameters())


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("at", {}),
        ("sp", {}),
        ("pkt", {}),
        ("fitnets", {}),
        ("adaptive", {"paths": ["st", "logits", "at", "nst", "fm"]}),
        ("infoflow", {}),
        ("infoflow_proxy", {}),
    ],
)
def test_a_resnet_teacher_teaches_a_mobilenet_student_through_feature_paths(name, params):
    method, teachers, losses = run_method(name, "mobilenet_v3_small", "resnet18", params)
    assert learns(method.student)
    assert all(p.grad is None for p in teachers[0].parameters())
    feature_losses = {k: v for k, v in losses.items() if k not in ("ce", "kd", "st", "logits", "sum_a")}
    assert feature_losses and all(v.item() > 0 for v in feature_losses.values()), losses


def test_dcm_heads_are_scaffolding_the_saved_networks_are_plain_models():
    method, _, losses = run_method("dcm", "resnet8", "resnet8", {"peer": "resnet14"})
    assert set(losses) == {"ce", "kl"}
    assert len(method.heads["student"]) == 2 and len(method.heads["peer"]) == 2  # c1, c2 per network, plus c3
    assert method.student.state_dict().keys() == build_model("resnet8", CLASSES).state_dict().keys()
    (model, peer) = method.peers()["peer"]
    assert model == "resnet14" and peer.state_dict().keys() == build_model("resnet14", CLASSES).state_dict().keys()


@pytest.mark.parametrize(("name", "key"), [("infoflow", "infoflow/weight_layer1"), ("adaptive", "adaptive/weight_at")])
def test_per_epoch_values_are_logged_and_plotted_into_the_run(tmp_path, name, key):
    """What the training loop does at each epoch's end, against a real MLflow store: the method's per-epoch values
    (infoflow's schedule, adaptive's exp(-a)) go in as metrics by epoch and as plots/<method>.png."""
    from kdpipe.job.spec import StageSpec
    from kdpipe.tracking.store import Tracker
    from kdpipe.worker.sinks import RunLog

    method, _, _ = run_method(name, "resnet8", "resnet8")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    run = tracker.client.create_run(tracker.experiment_id("plots")).info.run_id
    stage = StageSpec(name="student", model="resnet8", teachers=["t"], method=name, epochs=3)
    for epoch in range(3):
        method.set_epoch(epoch)
        if name == "adaptive":
            with torch.no_grad():
                method.log_vars.fill_(-0.5 * epoch)  # as if training had moved a
        RunLog(tracker, tracker.artifacts(run), run, stage).log_epoch(
            epoch, method.epoch_metrics(), method.epoch_metrics()
        )
    history = [value for _, value in sorted(tracker.metric_history(run, [key])[key])]
    expected = [100 * 0.7**e for e in range(3)] if name == "infoflow" else [1.0, 1.6487213, 2.7182818]
    assert history == pytest.approx(expected, rel=1e-6)
    plot = tracker.client.download_artifacts(run, f"plots/{name}.png", str(tmp_path))
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
