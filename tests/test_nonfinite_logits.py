"""NaN logits at perturbed points never decide success: every attack family (PGD, APGD, FAB,
Square, AutoAttack) counts no point fooled on them, returns a point with finite logits, and
warns once naming how many inputs met them."""
import re
import warnings

import pytest
import torch
from torch import nn

import fastadv
from fastadv.attacks.fab import FAB

import zoo

N = 16


class _NaNRegion(nn.Module):
    """The MNIST CNN, with all-NaN logits in a region around some of the reference points.

    rule "far": at points more than ``radius`` (L∞) from the reference point they are
    nearest to, for the references marked in ``poison``. rule "corner": where the mean
    change of the top-left 6x6 pixels from that reference is above 0.02 (for Square, whose
    random steps go in and out of it)."""

    def __init__(self, net, ref, poison, radius=0.05, rule="far"):
        super().__init__()
        self.net = net
        self.register_buffer("ref", ref.clone())
        self.register_buffer("poison", poison.clone())
        self.radius, self.rule = radius, rule

    def forward(self, x):
        z = self.net(x)
        d = (x.flatten(1)[:, None, :] - self.ref.flatten(1)[None]).abs().amax(2)
        dist, j = d.min(1)
        if self.rule == "far":
            bad = dist > self.radius
        else:
            bad = (x - self.ref[j])[:, :, :6, :6].flatten(1).mean(1) > 0.02
        bad = bad & self.poison[j]
        return torch.where(bad[:, None], torch.full_like(z, float("nan")), z)


@pytest.fixture(scope="module")
def setup():
    net, x, y = zoo.mnist_cnn_and_points(N)
    poison = torch.arange(N) % 2 == 0
    return net, x, y, poison


def _run_warned(fn):
    """Run ``fn``; return (its result, the number of inputs the one non-finite warning names)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    msgs = [str(w.message) for w in seen if "non-finite logits" in str(w.message)]
    assert len(msgs) == 1, msgs
    k = re.search(r"for (\d+) of (\d+) inputs", msgs[0])
    assert k and int(k.group(2)) == N, msgs[0]
    return out, int(k.group(1))


def _check_honest(model, x, y, x_adv, success):
    """Every success is backed by finite logits that fool the model at the point returned."""
    with torch.no_grad():
        z = model(x_adv)
    fin = torch.isfinite(z).all(1)
    assert bool(fin.all()), "a point with non-finite logits was returned"
    assert torch.equal(success, z.argmax(1) != y)


ATTACKS = {
    "pgd": lambda m: fastadv.PGD(m, eps=0.15, alpha=0.03, steps=8, seed=0),
    "pgd_last": lambda m: fastadv.PGD(m, eps=0.15, alpha=0.03, steps=8, seed=0, keep="last"),
    "pgd_bf16_stop": lambda m: fastadv.PGD(m, eps=0.15, alpha=0.03, steps=8, seed=0, amp="bf16",
                                           early_stop=True),
    "apgd": lambda m: fastadv.APGD(m, eps=0.15, steps=8, seed=0),
    "apgdt": lambda m: fastadv.APGDT(m, eps=0.15, steps=8, seed=0, n_target_classes=3),
    "fab": lambda m: FAB(m, eps=0.15, steps=8, seed=0),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_gradient_attacks_never_count_nan_as_fooled(setup, name):
    net, x, y, poison = setup
    model = _NaNRegion(net, x, poison).eval()
    atk = ATTACKS[name](model)
    res, k = _run_warned(lambda: atk.run(x, y))
    _check_honest(model, x, y, res.x_adv, res.success)
    flags = res.extra["nonfinite"]
    assert int(flags.sum()) == k >= 1
    assert not bool((flags & ~poison).any())            # only the poisoned points met NaN
    # the unpoisoned points are attacked as on the plain model
    plain = ATTACKS[name](net).run(x, y)
    assert int(res.success[~poison].sum()) == int(plain.success[~poison].sum())


def test_square_keeps_searching_from_a_nan_start(setup):
    net, x, y, poison = setup
    model = _NaNRegion(net, x, poison, rule="corner").eval()
    atk = fastadv.Square(model, eps=0.15, n_queries=40, seed=0)
    res, k = _run_warned(lambda: atk.run(x, y))
    _check_honest(model, x, y, res.x_adv, res.success)
    assert k >= 1 and not bool((res.extra["nonfinite"] & ~poison).any())
    # a point whose start had NaN logits used to stop there; now each spends its queries
    # (or stops once fooled)
    met = res.extra["nonfinite"] & ~res.success
    assert bool((res.extra["queries"][met] == 40 + 1).all())   # the start's query too


def test_all_nan_after_the_start_is_no_masking_error(setup):
    """Every perturbed point NaN: zero gradients everywhere, for a reason the warning gives
    (not "the output does not depend on x"); each point keeps its clean input."""
    net, x, y, _ = setup
    model = _NaNRegion(net, x, torch.ones(N, dtype=torch.bool), radius=0.0).eval()
    res, k = _run_warned(lambda: fastadv.PGD(model, eps=0.1, steps=3, seed=0).run(x, y))
    with torch.no_grad():
        clean_wrong = net(x).argmax(1) != y
    assert k == N
    assert torch.equal(res.x_adv, x) and torch.equal(res.success, clean_wrong)


def test_autoattack_warns_once_and_counts_no_nan(setup):
    net, x, y, poison = setup
    model = _NaNRegion(net, x, poison).eval()
    aa = fastadv.AutoAttack(model, eps=0.15, version="standard", steps=4, n_queries=20, seed=0)
    x_adv, k = _run_warned(lambda: aa.run_standard_evaluation(x, y, bs=N))
    ex = aa.last_result.extra
    _check_honest(model, x, y, x_adv, ~ex["robust"])
    assert int(ex["nonfinite"].sum()) == k >= 1
    assert not bool((ex["nonfinite"] & ~poison).any())


def test_autoattack_refuses_nan_on_clean_points(setup):
    """AutoAttack checks the first rows up front; a NaN clean point further on is an error
    too (it used to be counted misclassified, or correct, by the argmax of its NaN row)."""
    net, x, y, poison = setup
    model = _NaNRegion(net, x, poison, radius=-1.0).eval()   # NaN everywhere for the poisoned
    order = torch.cat([torch.arange(N)[~poison].repeat(3), torch.arange(N)[poison]])
    aa = fastadv.AutoAttack(model, eps=0.15, version="standard", steps=2, n_queries=5, seed=0,
                            checks=False)
    with pytest.raises(fastadv.attacks.NonFiniteLogitsError, match=r"non-finite logits .* on the clean input \(8 of 32 points\)"):
        aa.run_standard_evaluation(x[order], y[order], bs=N)
