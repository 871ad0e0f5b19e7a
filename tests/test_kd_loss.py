"""KD against values worked out independently: the reference's worked example 1 and the formula in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.methods import METHODS
from kdpipe.methods.kd import KDParams, kd_loss

ZS = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
ZT = [[2.0, 1.0, 0.0], [0.0, 0.0, 4.0]]
Y = [1, 2]


def numpy_kd(zs, zt, t):
    """T^2 * (1/B) sum_b sum_c p_t log(p_t / p_s), written out from the formula."""
    zs, zt = np.asarray(zs) / t, np.asarray(zt) / t
    ps = np.exp(zs) / np.exp(zs).sum(1, keepdims=True)
    pt = np.exp(zt) / np.exp(zt).sum(1, keepdims=True)
    return t * t * (pt * np.log(pt / ps)).sum(1).mean()


def test_kd_matches_worked_example():
    zs, zt = torch.tensor(ZS, dtype=torch.float64), torch.tensor(ZT, dtype=torch.float64)
    assert kd_loss(zs, zt, 4.0).item() == pytest.approx(0.261132, abs=1e-6)  # methods.md section 15, example 1
    assert kd_loss(zs, zt, 1.0).item() == pytest.approx(0.225616, abs=1e-6)  # the T = 1 (DML/DCM) value


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 10.0])
def test_kd_matches_numpy_formula(t):
    rng = np.random.default_rng(int(t))
    zs, zt = rng.normal(size=(5, 7)), rng.normal(size=(5, 7)) * 3
    assert kd_loss(torch.tensor(zs), torch.tensor(zt), t).item() == pytest.approx(numpy_kd(zs, zt, t), rel=1e-10)


class Fixed(torch.nn.Module):
    """A "network" that outputs fixed logits, with a parameter so gradients can be checked."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, images):
        return self.logits * 1


def test_kd_method_total_is_repdistiller_weighting():
    """0.1 * CE + 0.9 * KD = 0.262045 in the worked example; the teacher gets no gradient, the student does."""
    student, teacher = Fixed(ZS), Fixed(ZT)
    method = METHODS["kd"](student, [teacher], KDParams()).train()
    logits, losses = method.forward_train(torch.zeros(2), torch.tensor(Y))
    assert losses["ce"].item() == pytest.approx(0.1 * 0.270260, abs=1e-6)
    assert losses["kd"].item() == pytest.approx(0.9 * 0.261132, abs=1e-6)
    total = sum(losses.values())
    assert total.item() == pytest.approx(0.262045, abs=1e-6)
    total.backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert teacher.logits.grad is None
    assert not teacher.training


def test_kd_with_two_teachers_averages_their_terms():
    student = Fixed(ZS)
    method = METHODS["kd"](student, [Fixed(ZT), Fixed(ZS)], KDParams(ce_weight=0, kd_weight=1)).train()
    _, losses = method.forward_train(torch.zeros(2), torch.tensor(Y))
    # KD of the student against itself is 0, so the mean over the two teachers is half the worked value.
    assert losses["kd"].item() == pytest.approx(0.261132 / 2, abs=1e-6)
