"""C&W L2 and DeepFool: minimal distances on linear models (closed form), and on a real model."""
import math

import pytest
import torch

import zoo
from fastadv.attacks import CW, DeepFool


def _linear_case(n_cls, seed=0, n=30, d=12):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_cls, d, generator=g)
    b = torch.randn(n_cls, generator=g) * 0.1
    model = zoo.LinearModel(w, b).eval()
    x = 0.5 + 0.05 * (torch.rand(n, d, generator=g) - 0.5)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    diff = z.gather(1, y[:, None]) - z
    wn = (w[y][:, None, :] - w[None]).norm(dim=-1)
    dist = (diff / wn).scatter(1, y[:, None], math.inf).amin(1)   # exact minimal L2 distance
    keep = dist < 0.2                                              # the box is not in the way
    return model, x[keep], y[keep], dist[keep]


def test_deepfool_binary_linear_is_one_exact_step():
    model, x, y, dist = _linear_case(2)
    res = DeepFool(model, steps=50, overshoot=0.02).run(x, y)
    assert res.success.all()
    assert (res.steps == 1).all()
    # r = (|f| + 1e-4) / ‖w‖² · w, applied with (1 + overshoot)
    w = model.lin.weight[1] - model.lin.weight[0]
    expected = 1.02 * (dist + 1e-4 / w.norm())
    assert torch.allclose(res.extra["norm_found"], expected, rtol=1e-4, atol=1e-6)


def test_deepfool_multiclass_linear_never_beats_the_minimum():
    model, x, y, dist = _linear_case(5, seed=1)
    res = DeepFool(model).run(x, y)
    assert res.success.all()
    found = res.extra["norm_found"]
    assert (found >= dist * (1 - 1e-5)).all()
    assert (found <= dist * 1.5).all()


def test_cw_binary_search_reaches_the_minimal_l2_distance():
    model, x, y, dist = _linear_case(2, seed=2)
    res = CW(model, c=0.1, steps=200, lr=0.01, binary_search_steps=8).run(x, y)
    assert res.success.all()
    l2 = res.extra["l2"]
    assert (l2 >= dist * (1 - 1e-3)).all()      # no adversarial point is closer than the boundary
    assert (l2 <= dist * 1.15).all()            # and the search gets near it


@pytest.fixture(scope="module")
def mnist():
    return zoo.mnist_cnn_and_points(16)


def test_deepfool_and_cw_on_the_model(mnist):
    model, x, y = mnist
    df = DeepFool(model, steps=50, candidates=10).run(x, y)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        pred = model(df.x_adv).argmax(1)
    assert torch.equal(df.success, pred != y)
    assert df.success[clean_ok].float().mean() > 0.9
    assert df.x_adv.min() >= 0 and df.x_adv.max() <= 1
    cw = CW(model, c=10.0, steps=100, lr=0.05, binary_search_steps=3).run(x, y)
    with torch.no_grad():
        pred = model(cw.x_adv).argmax(1)
    assert torch.equal(cw.success, pred != y)
    assert cw.success[clean_ok].float().mean() > 0.9
    both = cw.success & df.success & clean_ok
    # C&W optimises the distance, DeepFool only linearises; with 3 binary-search steps
    # C&W is not fully converged (seen at 0.9x-1.13x DeepFool's median across trained
    # models), so only a grossly worse C&W fails here
    assert cw.extra["l2"][both].median() <= df.extra["norm_found"][both].median() * 1.5
    # points C&W misses come back unchanged
    assert torch.equal(cw.x_adv[~cw.success], x[~cw.success])
