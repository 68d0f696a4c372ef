"""NaN logits at perturbed points never decide the minimum-norm attacks' results: DeepFool and
CW count no point fooled (nor robust) by the argmax of a NaN row, return points with finite
logits, report ``extra["nonfinite"]`` per point and warn once, as PGD does
(tests/test_nonfinite_logits.py)."""

import pytest
import torch

import fastadv

import zoo
from test_nonfinite_logits import N, _NaNRegion, _run_warned, setup  # noqa: F401 (setup: a fixture)


ATTACKS = {
    "deepfool": lambda m: fastadv.DeepFool(m, steps=20),
    "deepfool_linf": lambda m: fastadv.DeepFool(m, steps=20, norm="Linf"),
    "deepfool_eps": lambda m: fastadv.DeepFool(m, steps=20, eps=3.0),
    "cw": lambda m: fastadv.CW(m, c=1.0, steps=30, lr=0.05, binary_search_steps=2),
}


def _fooled_at(model, x_adv, y):
    with torch.no_grad():
        z = model(x_adv)
    assert bool(torch.isfinite(z).all()), "a point with non-finite logits was returned"
    return z.argmax(1) != y


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_nan_rows_decide_nothing(setup, name):
    net, x, y, poison = setup
    model = _NaNRegion(net, x, poison).eval()
    res, k = _run_warned(lambda: ATTACKS[name](model).run(x, y))
    fooled = _fooled_at(model, res.x_adv, y)
    atk = ATTACKS[name](model)
    if getattr(atk, "eps", 0) > 0:
        within = (res.x_adv - x).flatten(1).norm(dim=1) <= atk.eps + 1e-6
        fooled = fooled & within
    assert torch.equal(res.success, fooled)
    flags = res.extra["nonfinite"]
    assert flags.dtype == torch.bool and flags.shape == (N,)
    assert int(flags.sum()) == k >= 1
    assert not bool((flags & ~poison).any())       # only the poisoned points met NaN
    # the unpoisoned points are attacked as on the plain model
    plain = ATTACKS[name](net).run(x, y)
    assert torch.equal(res.success[~poison], plain.success[~poison])
    assert not bool(plain.extra["nonfinite"].any())


def test_deepfool_nan_everywhere_off_the_clean_point(setup):
    """Every perturbed point NaN: nothing is fooled whatever the labels (the argmax of a NaN
    row is class 0: points labelled 0 used to count robust, the others fooled), every point
    is flagged and comes back clean."""
    net, x, y, _ = setup
    model = _NaNRegion(net, x, torch.ones(N, dtype=torch.bool), radius=0.0).eval()
    with torch.no_grad():
        clean_wrong = net(x).argmax(1) != y
    assert bool(clean_wrong.any()) and bool((y[~clean_wrong] == 0).any()) and bool((y != 0).any())
    for name in ("deepfool", "cw"):
        res, k = _run_warned(lambda: ATTACKS[name](model).run(x, y))
        # a point misclassified as it is stays fooled (at distance 0); no other is
        assert torch.equal(res.success, clean_wrong)
        assert torch.equal(res.x_adv, x)
        # DeepFool leaves fooled points alone; CW keeps minimising their distance, so every
        # point tried a NaN point there
        tried = ~clean_wrong if name == "deepfool" else torch.ones(N, dtype=torch.bool)
        assert torch.equal(res.extra["nonfinite"], tried) and k == int(tried.sum())


def test_cw_keeps_aborting_early_with_a_nan_row(setup):
    """A NaN row no longer makes the summed loss NaN (which kept abort_early from ever
    stopping a search step): it stops no later than on the plain model."""
    net, x, y, poison = setup
    model = _NaNRegion(net, x, poison).eval()
    make = lambda m: fastadv.CW(m, c=1.0, steps=200, lr=0.1, binary_search_steps=1)  # noqa: E731
    res, _ = _run_warned(lambda: make(model).run(x, y))
    assert int(res.steps.max()) < 200
    assert int(res.steps.max()) <= int(make(net).run(x, y).steps.max())


# Attacks that do not track non-finite logits along the way: the base class checks the points
# they return (one forward), reports them in extra["nonfinite"] and warns once.
UNTRACKED = {
    "SparseFool": lambda m: fastadv.SparseFool(m, steps=3),
    "OnePixel": lambda m: fastadv.OnePixel(m, pixels=40, steps=2, popsize=4, seed=0),
    "Pixle": lambda m: fastadv.Pixle(m, restarts=2, max_iterations=3, seed=0),
    "SPSA": lambda m: fastadv.SPSA(m, eps=0.3, nb_sample=8, seed=0),
    "GN": lambda m: fastadv.GN(m, std=0.3, seed=0),
    "JSMA": lambda m: fastadv.JSMA(m, gamma=0.05),
    "FMN": lambda m: fastadv.FMN(m, norm=2, steps=10),
    "EADL1": lambda m: fastadv.EADL1(m, max_iterations=10, binary_search_steps=2),
}


@pytest.mark.parametrize("name", sorted(UNTRACKED))
def test_returned_nonfinite_points_are_flagged_and_never_fooled(setup, name):
    import warnings
    net, x, y, poison = setup
    model = _NaNRegion(net, x, poison, radius=0.0).eval()   # any change of a poisoned point: NaN
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = UNTRACKED[name](model).run(x, y)
    msgs = [str(w.message) for w in seen if "non-finite logits" in str(w.message)]
    flags = res.extra["nonfinite"]
    with torch.no_grad():
        z = model(res.x_adv)
    assert torch.equal(flags, ~torch.isfinite(z).all(1))
    assert not bool((res.success & flags).any())

    assert len(msgs) == (1 if bool(flags.any()) else 0), msgs
