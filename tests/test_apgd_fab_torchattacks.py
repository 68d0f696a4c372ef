"""torchattacks' APGD/APGDT/FAB calls, only the import swapped: their defaults, APGD with EOT on a
randomised model, FAB in every norm and mode; each checked for strength against its torchattacks
counterpart on the same model and points (fooled at least as many, inside the ball)."""
import inspect

import pytest
import torch
from torch import nn

import zoo
import fastadv.attacks as fa

ta = pytest.importorskip("torchattacks")


@pytest.fixture(scope="module")
def mnist():
    return zoo.mnist_cnn_and_points(24, start=300)


def _dist(d, norm):
    d = d.flatten(1)
    return {"Linf": d.abs().amax(1), "L2": d.norm(dim=1), "L1": d.abs().sum(1)}[norm]


def _fooled(model, x, y, xa, eps, norm):
    assert _dist(xa - x, norm).max() <= eps * (1 + 1e-5) + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        return model(xa).argmax(1) != y


@pytest.mark.parametrize("name", ["APGD", "APGDT", "FAB"])
def test_defaults_are_torchattacks(name):
    ours = inspect.signature(getattr(fa, name)).parameters
    theirs = inspect.signature(getattr(ta, name)).parameters
    assert ours["steps"].default == theirs["steps"].default == 10
    for k, p in theirs.items():   # every torchattacks argument, in its place, with its default
        if k in ("model", "n_classes"):
            continue
        assert list(ours).index(k) == list(theirs).index(k), k
        assert ours[k].default == p.default, k


def test_n_classes_sets_the_targets_as_torchattacks():
    model = zoo.mnist_cnn()
    assert fa.APGDT(model, n_classes=10).n_target_classes == 9
    assert fa.APGDT(model, n_classes=5).n_target_classes == 4
    assert fa.FAB(model, n_classes=4, multi_targeted=True).n_target_classes == 3
    assert fa.APGDT(model, n_classes=10, n_target_classes=3).n_target_classes == 3
    with pytest.raises(ValueError, match="n_classes"):
        fa.FAB(model, n_classes=1)


# ------------------------------------------------------------------ APGD with EOT
class NoisyNet(nn.Module):
    """A randomised defence: Gaussian noise on the input at every forward pass."""

    def __init__(self, net, sigma):
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


def _majority_fooled(model, x, y, xa, draws=25):
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(123)
        votes = torch.stack([model(xa).argmax(1) for _ in range(draws)])
    return votes.mode(0).values != y


def test_apgd_eot_not_weaker_than_torchattacks(mnist):
    net, x, y = mnist
    model = NoisyNet(net, 0.3).eval()
    eps, kw = 0.1, dict(steps=10, eot_iter=8, seed=0)

    def attack(cls):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the model's noise draws from the global RNG
            xa = cls(model, eps=eps, **kw)(x, y)
        assert _dist(xa - x, "Linf").max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
        return _majority_fooled(model, x, y, xa)
    clean = ~_majority_fooled(model, x, y, x)
    ours, theirs = attack(fa.APGD) & clean, attack(ta.APGD) & clean
    # measured: 11 vs 10 of 21 (seeds 0 and 1); before the EOT result rule, 9 vs 10
    assert ours.sum() >= theirs.sum() and ours.sum() > 0


# ------------------------------------------------------------------ FAB, every norm and mode
@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 1.5)])
@pytest.mark.parametrize("multi_targeted", [False, True])
def test_fab_not_weaker_than_torchattacks(mnist, norm, eps, multi_targeted):
    model, x, y = mnist
    kw = dict(norm=norm, eps=eps, steps=10, multi_targeted=multi_targeted, n_classes=10, seed=0)
    ours = _fooled(model, x, y, fa.FAB(model, **kw)(x, y), eps, norm)
    theirs = _fooled(model, x, y, ta.FAB(model, **kw)(x, y), eps, norm)
    assert ours.sum() >= theirs.sum()
    assert ours.sum() > 0


@pytest.mark.parametrize("multi_targeted", [False, True])
def test_fab_l1(mnist, multi_targeted):
    # torchattacks 3.5.1's FAB fails with norm='L1' (UnboundLocalError in perturb): no peer
    # to compare against, so the bound and the success flags are checked instead
    model, x, y = mnist
    eps = 10.0
    res = fa.FAB(model, norm="L1", eps=eps, steps=10, multi_targeted=multi_targeted, n_classes=10,
                 seed=0).run(x, y)
    fooled = _fooled(model, x, y, res.x_adv, eps, "L1")
    assert torch.equal(fooled, res.success)
    assert res.success.float().mean() >= 0.5


def test_fab_targeted_mode_not_weaker_than_torchattacks(mnist):
    model, x, y = mnist
    target = (y + 1) % 10

    def reached(atk):
        atk.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10)
        xa = atk(x, y)
        _fooled(model, x, y, xa, 0.3, "Linf")
        with torch.no_grad():
            return model(xa).argmax(1) == target
    ours = reached(fa.FAB(model, eps=0.3, steps=10, n_classes=10, seed=0))
    theirs = reached(ta.FAB(model, eps=0.3, steps=10, n_classes=10, seed=0))
    assert ours.sum() >= theirs.sum() and ours.sum() > 0
