"""Randomized smoothing: the statistics against SciPy, and CERTIFY against the closed form of a
linear classifier (radius = distance to the hyperplane, Cohen et al. 2019, §3.1)."""
import copy
import math

import pytest
import torch
from torch import nn

from fastadv.eval.smoothing import (ABSTAIN, binom_test_two_sided, certified_accuracy, certify,
                                    clopper_pearson_lower, predict, sample_counts)


def test_clopper_pearson_own_bisection_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    k = torch.tensor([0, 1, 50, 97, 100, 623])
    for n, kk in ((100, k[:5]), (1000, k)):
        ours = clopper_pearson_lower(kk, n, 0.001, use_scipy=False)
        ref = torch.tensor([0.0 if v == 0 else stats.beta.ppf(0.001, v, n - v + 1) for v in kk.tolist()],
                           dtype=torch.float64)
        assert torch.allclose(ours, ref, atol=1e-9)


def test_binomial_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((5, 10), (9, 10), (60, 100), (0, 7), (520, 1000)):
        ref = stats.binomtest(k, n, 0.5).pvalue
        assert math.isclose(binom_test_two_sided(torch.tensor([k]), torch.tensor([n])).item(), ref,
                            rel_tol=1e-9, abs_tol=1e-12)


class _Halfspace(nn.Module):
    """Two classes: 1 where w·x + b > 0."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def test_certify_matches_the_closed_form_of_a_linear_classifier():
    g = torch.Generator().manual_seed(0)
    d, sigma, n, alpha = 5, 0.5, 20000, 0.001
    w = torch.randn(d, generator=g)
    model = _Halfspace(w, 0.1)
    x = torch.randn(12, d, generator=g) * 0.4
    margin = (x @ w + 0.1) / w.norm()           # signed distance to the boundary
    pred, radius = certify(model, x, sigma, n0=500, n=n, alpha=alpha, batch_size=4000, seed=1)
    p_true = torch.special.ndtr(margin.abs() / sigma).double()
    truth = (margin > 0).long()
    for i in range(len(x)):
        if p_true[i] > 0.6:  # far enough from 1/2 that the n0 samples pick the right class
            # the smoothed classifier's exact radius is the distance to the hyperplane;
            # CERTIFY returns σ·Φ⁻¹ of a lower confidence bound of p_A, so a bit less
            expected = sigma * torch.special.ndtri(clopper_pearson_lower(
                torch.tensor([round(p_true[i].item() * n)]), n, alpha))[0]
            assert pred[i] == truth[i]
            assert radius[i] <= abs(margin[i]) + 1e-6 + 0.02 * sigma
            assert abs(radius[i] - expected) < 0.05 * sigma
        if p_true[i] < 0.5005:
            assert pred[i] == ABSTAIN and radius[i] == 0
    ca = certified_accuracy(pred, radius, truth, [0.0, 0.25, 10.0])
    assert ca["certified_accuracy"][2] == 0.0
    assert ca["certified_accuracy"][0] >= ca["certified_accuracy"][1]


def test_predict_and_abstain_on_the_boundary():
    model = _Halfspace(torch.tensor([1.0, 0.0]), 0.0)
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-2.0, 1.0]])   # far +, on the boundary, far −
    pred = predict(model, x, sigma=0.25, n=2000, alpha=0.001, seed=0)
    assert pred.tolist()[0] == 1 and pred.tolist()[2] == 0
    assert pred.tolist()[1] in (ABSTAIN, 0, 1)
    single = predict(model, x[0], sigma=0.25, n=500, seed=0)
    assert single.dim() == 0 and single.item() == 1


def test_sample_counts_uses_its_own_generator():
    model = _Halfspace(torch.tensor([1.0, 0.0]), 0.0)
    state = torch.random.get_rng_state()
    a = sample_counts(model, torch.zeros(3, 2), 1.0, 300, batch_size=128,
                      generator=torch.Generator().manual_seed(5))
    b = sample_counts(model, torch.zeros(3, 2), 1.0, 300, batch_size=1000,
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.sum(1).tolist() == [300, 300, 300]
    assert (a[:, 1] > 100).all() and (a[:, 1] < 200).all()
    assert b.sum().item() == 900


def test_inputs_reach_the_model_in_its_own_dtype():
    """float64 x and a float32 model, or float32 x and a float64 model (with normalization
    too): the noisy batch is cast to the model's dtype, and both give the same certificates
    (the same noise: it is drawn in x's dtype)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    double = copy.deepcopy(model).double()
    x = torch.rand(3, 1, 2, 2)
    for xs, norm in ((x.double(), None), (x, ([0.5], [0.25]))):
        a = certify(model, xs, 0.25, n0=10, n=200, seed=1, normalization=norm)
        b = certify(double, xs, 0.25, n0=10, n=200, seed=1, normalization=norm)
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)
    # a plain callable hides its weights: it gets x as it is
    wrapped = certify(lambda t: double(t), x.double(), 0.25, n0=10, n=200, seed=1)
    assert torch.equal(wrapped[0], certify(double, x.double(), 0.25, n0=10, n=200, seed=1)[0])
    assert next(double.parameters()).dtype == torch.float64   # the models are left as they were
    assert next(model.parameters()).dtype == torch.float32


def test_normalization_channels_must_match_x():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="expected 3 channels"):
        certify(model, x, 0.25, n0=5, n=10, normalization=([0.5] * 3, [0.2] * 3))
