"""Every method's loss against values worked out independently: the reference's worked examples (methods.md,
section 15) and each paper's formula written out here in NumPy or plain Python, never by calling the code under
test for the expected value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdpipe.methods import METHODS
from kdpipe.methods.adaptive import aggregate, gram_loss
from kdpipe.methods.at import at_loss
from kdpipe.methods.dcm import smoothed_kl
from kdpipe.methods.dgkd import DGKDParams, dropped_teachers
from kdpipe.methods.dml import DMLParams, mutual_kl
from kdpipe.methods.fitnets import ConvReg
from kdpipe.methods.infoflow import InfoFlow, InfoFlowParams, flow_loss
from kdpipe.methods.pkt import pkt_loss
from kdpipe.methods.sp import sp_loss
from kdpipe.methods.takd import TAKDParams, takd_kl
from tests.test_kd_loss import ZS, ZT, Fixed, Y

F_S = [[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]  # the reference's example 3-5 features, B = 3, D = 2
F_T = [[1.0, 1.0], [0.0, 1.0], [3.0, 0.0]]


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --- TAKD and DGKD: KD with the element-mean KL ---------------------------------------------------------------


def test_takd_is_element_mean_kl_as_worked_example():
    assert takd_kl(t64(ZS), t64(ZT), 4.0).item() == pytest.approx(0.0870441, abs=1e-7)  # example 1, KL_em
    method = METHODS["takd"](Fixed(ZS), [Fixed(ZT)], TAKDParams(temperature=4, kd_weight=0.3))
    _, losses = method.forward_train(torch.zeros(2), torch.tensor(Y))
    # (1 - lambda) CE + lambda T^2 KL_em, with the example's CE 0.270260
    assert sum(losses.values()).item() == pytest.approx(0.7 * 0.270260 + 0.3 * 0.0870441, abs=1e-6)


def test_dgkd_sums_element_mean_kl_over_the_teachers_it_keeps():
    rng = np.random.default_rng(0)
    zs, zt1, zt2 = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    t = 5.0

    def kl_em(student, teacher):  # T^2 * mean over all B x C elements of p_t log(p_t / p_s)
        p_s, p_t = softmax(student / t), softmax(teacher / t)
        return t * t * (p_t * np.log(p_t / p_s)).mean()

    method = METHODS["dgkd"](Fixed(zs.tolist()), [Fixed(zt1.tolist()), Fixed(zt2.tolist())], DGKDParams(drop_prob=0))
    _, losses = method.forward_train(torch.zeros(4), torch.tensor([0, 1, 2, 3]))
    assert losses["ce"].item() == 0  # lambda = 1, the official default: no CE term
    assert losses["kd"].item() == pytest.approx(kl_em(zs, zt1) + kl_em(zs, zt2), rel=1e-9)


@pytest.mark.parametrize(("teachers", "p"), [(2, 0.25), (3, 0.25), (3, 0.5), (4, 0.6)])
def test_dgkd_drops_each_teacher_at_rate_p_and_never_all(teachers, p):
    batches = 20000
    generator = torch.Generator().manual_seed(teachers)
    masks = torch.stack([dropped_teachers(teachers, p, generator) for _ in range(batches)])
    standard_error = math.sqrt(p * (1 - p) / batches)
    for rate in masks.double().mean(0).tolist():
        assert abs(rate - p) < 3 * standard_error, (rate, p, standard_error)
    assert not masks.all(1).any()


def test_dgkd_refuses_a_drop_rate_that_would_drop_every_teacher():
    assert METHODS["dgkd"].check(DGKDParams(drop_prob=0.6), teachers=2) is not None
    assert METHODS["dgkd"].check(DGKDParams(drop_prob=0.5), teachers=2) is None


# --- feature methods -------------------------------------------------------------------------------------------


def test_at_matches_worked_example_and_formula():
    f_s = t64([[[[1, 0], [2, 1]], [[0, 1], [1, 3]]]])  # example 2: B = 1, D = 2, H = W = 2
    f_t = t64([[[[0.5, 1], [1, 1]], [[1, 0], [2, 2]]]])
    assert at_loss(f_s, f_t).item() == pytest.approx(0.0272532, abs=1e-7)

    def numpy_at(fs, ft):  # Q = vec(mean_d F_d^2) / ||.||, then mean of squared differences
        q = [(f**2).mean(1).reshape(f.shape[0], -1) for f in (fs, ft)]
        q = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in q]
        return ((q[0] - q[1]) ** 2).mean()

    rng = np.random.default_rng(1)
    fs, ft = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 6, 5, 5))
    assert at_loss(t64(fs), t64(ft)).item() == pytest.approx(numpy_at(fs, ft), rel=1e-9)
    # A larger map is average-pooled to the smaller one's size first.
    big = rng.normal(size=(3, 4, 10, 10))
    pooled = big.reshape(3, 4, 5, 2, 5, 2).mean((3, 5))
    assert at_loss(t64(big), t64(ft)).item() == pytest.approx(numpy_at(pooled, ft), rel=1e-9)


def test_sp_matches_worked_example_and_formula():
    assert sp_loss(t64(F_S), t64(F_T)).item() == pytest.approx(0.201039, abs=1e-6)  # example 3
    rng = np.random.default_rng(2)
    fs, ft = rng.normal(size=(5, 3, 2, 2)), rng.normal(size=(5, 7))
    g = [x.reshape(5, -1) @ x.reshape(5, -1).T for x in (fs, ft)]
    g = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in g]
    assert sp_loss(t64(fs), t64(ft)).item() == pytest.approx(((g[1] - g[0]) ** 2).sum() / 25, rel=1e-9)


def test_pkt_matches_worked_example_and_formula():
    assert pkt_loss(t64(F_S), t64(F_T)).item() == pytest.approx(0.0150384, abs=1e-7)  # example 4
    rng = np.random.default_rng(3)
    fs, ft = rng.normal(size=(6, 4)), rng.normal(size=(6, 9))

    def probabilities(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-7)
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    p_s, p_t = probabilities(fs), probabilities(ft)
    expected = (p_t * np.log((p_t + 1e-7) / (p_s + 1e-7))).mean()
    assert pkt_loss(t64(fs), t64(ft)).item() == pytest.approx(expected, rel=1e-9)


def test_fitnets_regressor_shapes_and_hint_loss():
    """ConvReg's three cases, and the hint loss mean((r(F_s) - F_t)^2) with r made the identity by hand."""
    assert ConvReg(torch.Size([8, 16, 16]), torch.Size([4, 8, 8]))(torch.zeros(2, 8, 16, 16), None)[0].shape == (
        2,
        4,
        8,
        8,
    )
    assert ConvReg(torch.Size([8, 4, 4]), torch.Size([4, 8, 8]))(torch.zeros(2, 8, 4, 4), None)[0].shape[1:] == (
        4,
        8,
        8,
    )
    assert ConvReg(torch.Size([8, 6, 6]), torch.Size([4, 4, 4]))(torch.zeros(2, 8, 6, 6), None)[0].shape[1:] == (
        4,
        4,
        4,
    )
    regressor = ConvReg(torch.Size([2, 3, 3]), torch.Size([2, 3, 3])).double().eval()
    with torch.no_grad():
        regressor.body[0].weight.copy_(torch.eye(2, dtype=torch.float64)[:, :, None, None])
        regressor.body[0].bias.zero_()
    rng = np.random.default_rng(4)
    fs, ft = rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(2, 2, 3, 3))
    mapped, target = regressor(t64(fs), t64(ft))
    bn_scale = 1 / math.sqrt(1 + 1e-5)  # BN in eval with its initial statistics: x / sqrt(1 + eps)
    expected = ((np.maximum(fs * bn_scale, 0) - ft) ** 2).mean()
    assert torch.nn.functional.mse_loss(mapped, target).item() == pytest.approx(expected, rel=1e-9)


# --- information flow ------------------------------------------------------------------------------------------


def test_information_flow_layer_loss_matches_worked_example_and_formula():
    assert flow_loss(t64(F_T), t64(F_S)).item() == pytest.approx(0.0378104, abs=1e-7)  # example 5: teacher, student
    rng = np.random.default_rng(5)
    t, s = rng.normal(size=(5, 8)), rng.normal(size=(5, 3))

    def kernels(x):
        unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)
        cosine = (1 + unit @ unit.T) / 2
        distance = np.sqrt(
            np.array([[max(((a - b) ** 2).sum(), 0.0) for b in x] for a in x]) + 1e-6
        )  # written pairwise, not by the |a|^2 + |b|^2 - 2ab expansion the code uses
        inverse = 1 / (1 + distance)
        return [k / k.sum(1, keepdims=True) for k in (cosine, inverse)]

    expected = sum(
        ((pt - ps) * (np.log(pt) - np.log(ps))).mean() for pt, ps in zip(kernels(t), kernels(s), strict=True)
    )
    assert flow_loss(t64(t), t64(s)).item() == pytest.approx(expected, rel=1e-6)


def jeffreys_flow(t: np.ndarray, s: np.ndarray) -> float:
    """The paper's layer loss, written pairwise: both kernels row-normalised, Jeffreys divergence, mean."""

    def kernels(x):
        unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)
        cosine = (1 + unit @ unit.T) / 2
        distance = np.sqrt(np.array([[((a - b) ** 2).sum() for b in x] for a in x]) + 1e-6)
        inverse = 1 / (1 + distance)
        return [k / k.sum(1, keepdims=True) for k in (cosine, inverse)]

    return sum(((pt - ps) * (np.log(pt) - np.log(ps))).mean() for pt, ps in zip(kernels(t), kernels(s), strict=True))


@pytest.mark.parametrize("pool", [None, 2])
def test_information_flow_loss_on_the_official_taps_is_the_papers(pool):
    """Issue 34, point 7: stage B's flow loss over a CIFAR student's and proxy's stage maps (16 x 16 and 8 x 8 at
    32 pixels) and pooled vectors, taken here by torchvision's feature extractor, flattened whole as the official
    code does (or average-pooled to `pool_maps` x `pool_maps` first), at epoch 0's weights (100 for each
    intermediate pair, 1 for the deepest)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from kdpipe.models import build_model

    torch.manual_seed(0)
    student, proxy = build_model("resnet8", 10).double().eval(), build_model("resnet14", 10).double().eval()
    params = InfoFlowParams(ce_weight=0, pool_maps=pool)
    method = InfoFlow(student, [proxy], params, model="resnet8", num_classes=10, image_size=32).eval()
    images, labels = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    nodes = ["layer1", "layer2", "layer3", "flatten"]
    assert method.pairs == list(zip(nodes, nodes, strict=True))

    with torch.no_grad():
        _, losses = method.forward_train(images, labels)
        taps = [create_feature_extractor(net, nodes)(images) for net in (student, proxy)]
    expected = 0.0
    for node, weight in zip(nodes, [100.0, 100.0, 100.0, 1.0], strict=True):
        s, t = (tap[node] for tap in taps)
        if pool is not None and s.dim() == 4 and s.shape[-1] > pool:
            s, t = (torch.nn.functional.adaptive_avg_pool2d(x, pool) for x in (s, t))
        expected += weight * jeffreys_flow(t.flatten(1).numpy(), s.flatten(1).numpy())
    assert taps[0]["layer1"].shape[-1] == 32 and taps[0]["layer3"].shape[-1] == 8  # maps larger than 4 x 4
    assert losses["flow"].item() == pytest.approx(expected, rel=1e-9)


def test_critical_period_schedule_is_the_papers():
    method = InfoFlow.__new__(InfoFlow)  # the schedule needs only the params and the number of pairs
    method.params, method.pairs = InfoFlowParams(), [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
    for epoch, intermediate in ((0, 100.0), (12, 100 * 0.7**12), (13, 0.969), (26, 0.0094)):
        method.epoch = epoch
        *early, last = method.layer_weights()
        assert last == 1.0
        assert early == pytest.approx([intermediate] * 3, rel=2e-3)  # the reference rounds to 3-4 digits
    method.epoch = 12
    assert method.layer_weights()[0] > 1  # the critical period: intermediate layers lead up to epoch 12
    method.epoch = 13
    assert method.layer_weights()[0] < 1


# --- adaptive aggregation --------------------------------------------------------------------------------------


def test_adaptive_aggregation_matches_worked_example():
    """CE 2.0, L_AT 0.05, L_ST 1.2, a = 0: L = 3.25, dL/da = 1 - exp(-a) L = (0.95, -0.2) (example 6)."""
    log_vars = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    terms, regulariser = aggregate(t64([0.05, 1.2]), log_vars)
    total = 2.0 + terms.sum() + regulariser
    assert total.item() == pytest.approx(3.25)
    total.backward()
    assert log_vars.grad.tolist() == pytest.approx([0.95, -0.2])
    # At the stationary point a* = log L the gradient vanishes.
    at_optimum = torch.log(t64([0.05, 1.2])).requires_grad_()
    terms, regulariser = aggregate(t64([0.05, 1.2]), at_optimum)
    (terms.sum() + regulariser).backward()
    assert at_optimum.grad.tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert at_optimum.detach().tolist() == pytest.approx([-2.99573, 0.182322], abs=1e-5)
    fixed, zero = aggregate(t64([0.05, 1.2]), None)
    assert fixed.sum().item() + zero.item() == pytest.approx(1.25)


def test_adaptive_nst_gram_loss_matches_formula():
    rng = np.random.default_rng(6)
    fs, ft = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))

    def gram(f):
        flat = f.reshape(2, 3, 16)
        flat = flat / np.linalg.norm(flat, axis=2, keepdims=True)
        return np.einsum("bik,bjk->bij", flat, flat)

    assert gram_loss(t64(fs), t64(ft)).item() == pytest.approx(((gram(fs) - gram(ft)) ** 2).mean(), rel=1e-9)


# --- mutual learning -------------------------------------------------------------------------------------------


def test_dml_kl_matches_worked_example_and_sums_over_peers():
    assert mutual_kl(t64(ZS), [t64(ZT)]).item() == pytest.approx(0.225616, abs=1e-6)  # example 1 at T = 1
    rng = np.random.default_rng(7)
    z = [rng.normal(size=(3, 5)) for _ in range(3)]

    def kl(target, logits):
        p, q = softmax(target), softmax(logits)
        return (p * np.log(p / q)).sum(1).mean()

    expected = kl(z[1], z[0]) + kl(z[2], z[0])
    assert mutual_kl(t64(z[0]), [t64(z[1]), t64(z[2])]).item() == pytest.approx(expected, rel=1e-9)


def test_dml_method_sums_each_peers_ce_and_kl():
    peers = [Fixed(ZS), Fixed(ZT)]
    method = METHODS["dml"](peers[0], [], DMLParams(), model="resnet8", num_classes=3)
    method.others = torch.nn.ModuleList([peers[1]])  # fixed logits in place of the built peer
    _, losses = method.forward_train(torch.zeros(2), torch.tensor(Y))
    ce = [-np.log(softmax(np.array(z))[[0, 1], Y]).mean() for z in (ZS, ZT)]
    assert losses["ce"].item() == pytest.approx(ce[0], rel=1e-9)
    assert losses["ce_peer1"].item() == pytest.approx(ce[1], rel=1e-9)
    assert losses["kl"].item() == pytest.approx(0.225616, abs=1e-6)  # KL(peer 2 || peer 1)
    kl_back = (softmax(np.array(ZS)) * np.log(softmax(np.array(ZS)) / softmax(np.array(ZT)))).sum(1).mean()
    assert losses["kl_peer1"].item() == pytest.approx(kl_back, rel=1e-9)


def test_dcm_smoothed_kl_matches_formula_and_worked_example():
    classes, eps = 3, 1e-8
    p = (softmax(np.array(ZT)) + eps) / (1 + classes * eps)
    q = (softmax(np.array(ZS)) + eps) / (1 + classes * eps)
    assert smoothed_kl(t64(ZT), t64(ZS)).item() == pytest.approx((p * np.log(p / q)).sum(1).mean(), rel=1e-9)
    assert smoothed_kl(t64(ZT), t64(ZS)).item() == pytest.approx(0.225616, abs=1e-6)  # smoothing changes ~nothing


def test_dcm_dense_cross_layer_sum_is_all_18_pairs_both_ways():
    """Section 12 written out: outputs o = [c1, c2, c3 of net 1 (a), c1, c2, c3 of net 2 (b)];
    L = sum of the six CEs + sum over the 18 ordered pairs (m, r) in different networks of KL_eps(p_r || p_m),
    p_r detached. The pairs are listed by hand, not generated."""
    pairs = [  # (m, r): m learns from r
        ("a1", "b1"), ("a1", "b2"), ("a1", "b3"),
        ("a2", "b1"), ("a2", "b2"), ("a2", "b3"),
        ("a3", "b1"), ("a3", "b2"), ("a3", "b3"),
        ("b1", "a1"), ("b1", "a2"), ("b1", "a3"),
        ("b2", "a1"), ("b2", "a2"), ("b2", "a3"),
        ("b3", "a1"), ("b3", "a2"), ("b3", "a3"),
    ]  # fmt: skip
    assert len(set(pairs)) == 18
    rng = np.random.default_rng(12)
    batch, classes, eps = 4, 5, 1e-8
    logits = {name: rng.normal(size=(batch, classes)) * 2 for name in ("a1", "a2", "a3", "b1", "b2", "b3")}
    labels = np.array([0, 3, 4, 1])

    def smoothed(z):
        return (softmax(z) + eps) / (1 + classes * eps)

    ce = sum(-np.log(softmax(z)[np.arange(batch), labels]).mean() for z in logits.values())
    kl = sum((smoothed(logits[r]) * np.log(smoothed(logits[r]) / smoothed(logits[m]))).sum(1).mean() for m, r in pairs)

    from kdpipe.methods.dcm import DCMParams
    from kdpipe.models import build_model

    method = METHODS["dcm"](build_model("resnet8", classes), [], DCMParams(), model="resnet8", num_classes=classes)
    outputs = {name: torch.tensor(z, requires_grad=True) for name, z in logits.items()}
    method.outputs = lambda key, images: [outputs[("a" if key == "student" else "b") + level] for level in "123"]
    final, losses = method.forward_train(torch.zeros(batch), torch.tensor(labels))
    assert final is outputs["a3"]  # net 1's own classifier is the stage's output
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert losses["kl"].item() == pytest.approx(kl, rel=1e-9)
    # Each output learns only from its three partners in the other network (targets detached): with s = softmax(o_m)
    # and w = p_r * s / (s + eps), d KL_eps(p_r || q_m) / d o_m = -(w - s * sum(w)) / B (without the smoothing,
    # the familiar (s - p_r) / B).
    losses["kl"].backward()
    for m, z in logits.items():
        s = softmax(z)
        expected = 0
        for r in (r for mm, r in pairs if mm == m):
            w = smoothed(logits[r]) * s / (s + eps)
            expected = expected - (w - s * w.sum(1, keepdims=True)) / batch
        np.testing.assert_allclose(outputs[m].grad.numpy(), expected, rtol=1e-9, atol=1e-12)
