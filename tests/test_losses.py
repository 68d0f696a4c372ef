"""fastadv.losses against hand-computed cases."""
import math

import pytest
import torch

from fastadv import losses

Z = torch.tensor([[3.0, 1.0, 0.0, -2.0],
                  [0.5, 2.5, 1.5, 0.0]])
Y = torch.tensor([0, 0])


def test_margin_by_hand():
    # sample 0: 3 - 1 = 2 ; sample 1: 0.5 - 2.5 = -2
    assert torch.allclose(losses.margin(Z, Y), torch.tensor([2.0, -2.0]))


def test_cross_entropy_by_hand():
    lse0 = math.log(math.exp(3) + math.exp(1) + 1 + math.exp(-2))
    assert losses.cross_entropy(Z, Y)[0].item() == pytest.approx(lse0 - 3.0, rel=1e-6)


def test_cw_loss_by_hand():
    assert torch.allclose(losses.cw_loss(Z, Y), torch.tensor([-2.0, 2.0]))
    assert torch.allclose(losses.cw_loss(Z, Y, kappa=1.0), torch.tensor([-2.0, 1.0]))
    t = torch.tensor([1, 2])
    # targeted: z_t - max_{j≠t} z_j: sample0 1-3 = -2; sample1 1.5-2.5 = -1
    assert torch.allclose(losses.cw_loss(Z, t, targeted=True), torch.tensor([-2.0, -1.0]))


def test_hinge_loss_by_hand():
    # max(0, 1 - margin): sample0 max(0, -1)=0 ; sample1 1+2 = 3
    assert torch.allclose(losses.hinge_loss(Z, Y, m=1.0, reduction="none"), torch.tensor([0.0, 3.0]))
    assert losses.hinge_loss(Z, Y, m=1.0).item() == pytest.approx(1.5)


def test_dlr_by_hand():
    # sample0 sorted 3,1,0,-2: -(3-1)/(3-0) = -2/3 ; sample1 sorted 2.5,1.5,0.5,0: -(0.5-2.5)/(2.5-0.5) = 1
    assert torch.allclose(losses.dlr_loss(Z, Y), torch.tensor([-2 / 3, 1.0]), atol=1e-6)


def test_dlr_is_scale_and_shift_invariant():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    assert torch.allclose(losses.dlr_loss(z, y), losses.dlr_loss(7.0 * z + 3.0, y), atol=1e-5)


def test_dlr_targeted_by_hand():
    t = torch.tensor([3, 2])
    # sample0: -(3 - (-2)) / (3 - (0 + -2)/2) = -5/4 ; sample1: -(0.5-1.5)/(2.5 - (0.5+0)/2) = 1/2.25
    expect = torch.tensor([-5 / 4, 1 / 2.25])
    assert torch.allclose(losses.dlr_loss_targeted(Z, Y, t), expect, atol=1e-6)


def test_trades_kl_by_hand():
    za = torch.tensor([[0.0, 0.0]])
    zn = torch.tensor([[math.log(3.0), 0.0]])  # p_nat = (3/4, 1/4), p_adv = (1/2, 1/2)
    expect = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.trades_kl(za, zn).item() == pytest.approx(expect, rel=1e-6)
    assert losses.trades_kl(zn, zn).item() == pytest.approx(0.0, abs=1e-7)


def test_mart_terms_by_hand():
    za = torch.tensor([[0.0, 0.0, math.log(2.0)]])  # p_adv = (1/4, 1/4, 1/2)
    zn = torch.tensor([[math.log(2.0), 0.0, 0.0]])  # p_nat = (1/2, 1/4, 1/4)
    y = torch.tensor([0])
    bce = -math.log(0.25) - math.log(1 - 0.5)
    assert losses.mart_bce(za, y).item() == pytest.approx(bce, rel=1e-6)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert losses.mart_kl(za, zn, y).item() == pytest.approx(kl * (1 - 0.5), rel=1e-6)
    assert losses.mart_loss(za, zn, y, beta=6.0).item() == pytest.approx(bce + 6 * kl * 0.5, rel=1e-6)


def test_attack_loss_dispatch_and_errors():
    assert torch.equal(losses.attack_loss("cw", Z, Y), losses.cw_loss(Z, Y))
    t = torch.tensor([1, 2])
    assert torch.allclose(losses.attack_loss("ce", Z, Y, targeted=True, target=t),
                          -losses.cross_entropy(Z, t))
    with pytest.raises(ValueError, match="loss"):
        losses.attack_loss("hinge", Z, Y)
    with pytest.raises(ValueError, match="target"):
        losses.attack_loss("ce", Z, Y, targeted=True)
    with pytest.raises(ValueError, match="y"):
        losses.margin(Z, torch.tensor([0]))
    with pytest.raises(ValueError, match="reduction"):
        losses.hinge_loss(Z, Y, reduction="avg")
