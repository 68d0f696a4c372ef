"""APGD / APGD-T: the schedule and losses on hand-computed cases, and the attacks on a real model."""
import pytest
import torch
from torch import nn

import zoo
from fastadv import losses
from fastadv.attacks import APGD, APGDT
from fastadv.attacks.apgd import (apgd_checkpoints, apgd_l1_checkpoints, l1_project_delta,
                                  step_size_reduction)


@pytest.fixture(scope="module")
def mnist():
    return zoo.mnist_cnn_and_points(40)


# ------------------------------------------------------------ the schedule
def test_checkpoints_100_steps_match_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)
    assert apgd_checkpoints(100) == [(22, 22), (41, 19), (57, 16), (70, 13), (80, 10), (87, 7),
                                     (93, 6), (99, 6)]


def test_checkpoints_small_cases_by_hand():
    # 10 steps: first window int(2.2) = 2, then shrinking by max(int(0.3), 1) = 1 to min 1
    assert apgd_checkpoints(10) == [(2, 2)] + [(t, 1) for t in range(3, 11)]
    # 20 steps: int(4.4) = 4, decrement 1 (int(0.6) -> 1), minimum int(1.2) = 1
    assert apgd_checkpoints(20) == [(4, 4), (7, 3), (9, 2), (10, 1)] + [(t, 1) for t in range(11, 21)]
    assert apgd_checkpoints(1) == [(1, 1)]
    assert apgd_checkpoints(0) == []
    # L1-APGD checks every int(0.04 * steps) iterations
    assert apgd_l1_checkpoints(100) == [(t, 4) for t in range(4, 101, 4)]


def test_step_size_reduction_conditions():
    k, rho = 22, 0.75  # ρ·k = 16.5
    t = torch.tensor
    # condition 1: the loss rose in at most ρ·k of the last k steps
    fl = step_size_reduction(t([16, 17, 0, 22]), k, rho, t([True] * 4), t([0.0] * 4), t([1.0] * 4))
    assert fl.tolist() == [True, False, True, False]
    # condition 2: not halved last time and no improvement of the best loss since
    fl = step_size_reduction(t([20, 20, 20]), k, rho, t([False, False, True]),
                             t([1.0, 0.5, 1.0]), t([1.0, 1.0, 1.0]))
    assert fl.tolist() == [True, False, False]
    # the boundary: exactly ρ·k increases counts as oscillation (the reference's "<=")
    assert step_size_reduction(t([12]), 16, 0.75, t([True]), t([0.0]), t([1.0])).tolist() == [True]


class _Constant(nn.Module):
    """Logits that ignore the input: the loss never changes, so every checkpoint halves."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0, 1.0, 0.5, 0.0]))

    def forward(self, x):
        return self.w.expand(x.shape[0], -1) + 0.0 * x.flatten(1)[:, :1]


def test_step_size_halves_at_every_checkpoint_when_the_loss_is_flat():
    x = torch.rand(3, 1, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    eps = 0.1
    res = APGD(_Constant(), eps=eps, steps=100, loss="dlr").run(x, y)
    n_checks = len(apgd_checkpoints(100))
    expected = 2 * eps / 2 ** n_checks
    assert torch.allclose(res.extra["step_size"], torch.full((3,), expected))
    assert not res.success.any()


# ------------------------------------------------------------------ losses
def test_dlr_loss_hand_computed():
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0],    # y = 0 not on top: -(1 - 3) / (3 - 1) = 1
                      [1.0, 3.0, 2.0, 0.0]])   # y = 1 on top:     -(3 - 2) / (3 - 1) = -0.5
    y = torch.tensor([0, 1])
    assert torch.allclose(losses.dlr_loss(z, y), torch.tensor([1.0, -0.5]))
    # targeted: -(z_y - z_t) / (z_π1 - (z_π3 + z_π4)/2) = -(4 - 2) / (4 - 1.5) = -0.8
    z = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.allclose(losses.dlr_loss_targeted(z, torch.tensor([0]), torch.tensor([2])),
                          torch.tensor([-0.8]))


def test_dlr_losses_match_the_reference_formulas():
    torchattacks = pytest.importorskip("torchattacks")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 10, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    t = (y + torch.randint(1, 10, (50,), generator=g)) % 10
    ref = torchattacks.APGD.dlr_loss(None, z, y)
    assert torch.allclose(losses.dlr_loss(z, y), ref, atol=1e-6)
    ref_t = torchattacks.APGDT.dlr_loss_targeted(None, z, y, t)
    assert torch.allclose(losses.dlr_loss_targeted(z, y, t), ref_t, atol=1e-6)


def test_l1_projection_is_feasible_and_optimal():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 30, generator=g)
    d = torch.randn(20, 30, generator=g)
    eps = torch.full((20,), 2.0)
    p = l1_project_delta(x, d, eps, 0.0, 1.0)
    assert (p.abs().sum(1) <= 2.0 + 1e-4).all()
    assert ((x + p) >= -1e-6).all() and ((x + p) <= 1 + 1e-6).all()
    # no random feasible point is closer to d than the projection
    for _ in range(200):
        q = torch.randn(20, 30, generator=g) * 0.1 + p
        q = l1_project_delta(x, q, eps, 0.0, 1.0)  # some feasible point
        assert ((q - d).norm(dim=1) >= (p - d).norm(dim=1) - 1e-4).all()


# ------------------------------------------------------------ on the model
def _valid(x, xa, eps, norm):
    d = (xa - x).flatten(1)
    n = {"Linf": d.abs().amax(1), "L2": d.norm(dim=1), "L1": d.abs().sum(1)}[norm]
    assert (n <= eps * (1 + 1e-5) + 1e-6).all()
    assert xa.min() >= 0 and xa.max() <= 1


@pytest.mark.parametrize("norm,eps,loss", [("Linf", 0.1, "ce"), ("Linf", 0.1, "dlr"),
                                           ("L2", 1.5, "ce"), ("L1", 10.0, "ce")])
def test_apgd_fools_the_model_within_the_ball(mnist, norm, eps, loss):
    model, x, y = mnist
    res = APGD(model, norm=norm, eps=eps, steps=20, loss=loss, seed=0).run(x, y)
    _valid(x, res.x_adv, eps, norm)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert res.success.float().mean() > 0.1  # a standard CNN is not robust at these budgets


def test_early_stop_changes_cost_not_result(mnist):
    model, x, y = mnist
    a = APGD(model, eps=0.1, steps=20, seed=1, early_stop=True).run(x, y)
    b = APGD(model, eps=0.1, steps=20, seed=1, early_stop=False).run(x, y)
    # rows are independent: dropping fooled ones leaves the others' trajectories alone
    assert (a.success != b.success).sum() <= 1
    assert a.steps.sum() < b.steps.sum()


def test_restarts_batched_are_at_least_as_strong(mnist):
    model, x, y = mnist
    one = APGD(model, eps=0.08, steps=10, n_restarts=1, seed=3).run(x, y)
    three = APGD(model, eps=0.08, steps=10, n_restarts=3, seed=3).run(x, y)
    # the first of the three restarts draws the same start as the single run
    assert three.success.sum() >= one.success.sum() - 1
    assert three.steps.sum() > one.steps.sum()


def test_apgdt_targets_top_classes_and_is_strong(mnist):
    model, x, y = mnist
    res = APGDT(model, eps=0.1, steps=10, seed=0).run(x, y)
    _valid(x, res.x_adv, 0.1, "Linf")
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    ce = APGD(model, eps=0.1, steps=10, seed=0).run(x, y)
    # nine targeted runs per point: not weaker than one untargeted run (a point of slack)
    assert res.success.sum() >= ce.success.sum() - 1


def test_apgd_keeps_model_and_global_rng(mnist):
    model, x, y = mnist
    model.train()
    state = torch.random.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    APGD(model, eps=0.1, steps=5).run(x[:8], y[:8])
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model.eval()


def test_apgd_torchattacks_call_shape(mnist):
    model, x, y = mnist
    atk = APGD(model, "Linf", 0.1, 10, 1, 0, "ce", 1, 0.75, False)
    xa = atk(x[:4], y[:4])
    assert xa.shape == x[:4].shape and xa.dtype == x.dtype
    with pytest.raises(ValueError):
        APGD(model, norm="L3")
    with pytest.raises(ValueError):
        APGD(model, rho=1.5)


class _ThreeClasses(nn.Module):
    def forward(self, x):
        f = x.flatten(1)
        return torch.stack([f.sum(1), -f.sum(1), f[:, 0]], 1)


def test_apgdt_needs_four_classes_for_targeted_dlr():
    with pytest.raises(ValueError, match="4 classes"):
        APGDT(_ThreeClasses(), eps=0.1, steps=2).run(torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
