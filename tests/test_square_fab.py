"""Square (black-box) and FAB / FAB-T: geometry on closed-form cases, attacks on a real model."""
import math

import pytest
import torch
from torch import nn

import zoo
from fastadv.attacks import FAB, FABT, Square
from fastadv.attacks.fab import project_onto_hyperplane
from fastadv.attacks.square import p_selection, square_meta_pattern


@pytest.fixture(scope="module")
def mnist():
    return zoo.mnist_cnn_and_points(48)


# ------------------------------------------------------------------ Square
def test_p_schedule_halves_on_the_paper_iterations():
    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 10, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 51, 10000) == 0.2
    assert p_selection(0.8, 8001, 10000) == 0.8 / 512
    # 5000 queries: the schedule is stretched to 10,000 (iteration 100 -> 200)
    assert p_selection(0.8, 100, 5000) == 0.8 / 4
    assert p_selection(0.8, 101, 5000) == 0.8 / 8


def test_meta_pattern_is_unit_norm_and_antisymmetric_in_sign():
    for s in (3, 5, 8):
        eta = square_meta_pattern(s)
        assert eta.shape == (s, s)
        assert math.isclose(eta.norm().item(), 1.0, rel_tol=1e-5)
        assert (eta[: s // 2] >= 0).all() and (eta[s // 2:] <= 0).all()


@pytest.mark.parametrize("norm,eps", [("Linf", 0.3), ("L2", 3.0)])
def test_square_fools_an_undefended_model(mnist, norm, eps):
    model, x, y = mnist
    x, y = (x, y) if norm == "Linf" else (x[:24], y[:24])
    res = Square(model, norm=norm, eps=eps, n_queries=300, seed=0).run(x, y)
    d = (res.x_adv - x).flatten(1)
    n = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (n <= eps * (1 + 1e-5)).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert res.success.float().mean() > (0.8 if norm == "Linf" else 0.5)
    q = res.extra["queries"]
    assert (q <= 301).all() and (q[res.success] < 301).any()


@pytest.mark.parametrize("restarts,early_stop", [(3, True), (3, False), (1, True)])
def test_square_restarts_and_early_stop(mnist, restarts, early_stop):
    model, x, y = mnist
    x, y = x[:48], y[:48]
    res = Square(model, eps=0.15, n_queries=60, n_restarts=restarts, early_stop=early_stop,
                 seed=1).run(x, y)
    assert ((res.x_adv - x).flatten(1).abs().amax(1) <= 0.15 * (1 + 1e-5)).all()
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    q = res.extra["queries"]  # summed over a point's restarts
    assert (q <= restarts * 61).all()
    if early_stop and restarts > 1:
        # a point leaves once any of its rows succeeds: its other rows stop with it
        assert (q[res.success] < restarts * 61).all()
    one = Square(model, eps=0.15, n_queries=60, seed=1).run(x, y)
    if restarts > 1:
        assert res.success.sum() >= one.success.sum() - 2


def test_square_three_channels_changes_every_window():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)).eval()
    x = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = Square(model, eps=0.05, n_queries=40, seed=0).run(x, y)
    d = (res.x_adv - x).abs()
    assert (d.flatten(1).amax(1) <= 0.05 * (1 + 1e-5)).all()
    # the stripes start at +-eps everywhere (or a bound): every pixel sits on the ball's faces
    on_face = (d - 0.05).abs() < 1e-6
    at_bound = (res.x_adv == 0) | (res.x_adv == 1)
    assert (on_face | at_bound).all()


def test_square_uses_no_gradients(mnist):
    model, x, y = mnist

    class NoGrad(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            if torch.is_grad_enabled() and x.requires_grad:
                raise AssertionError("Square asked for a gradient")
            return self.m(x)

    res = Square(NoGrad(model), eps=0.3, n_queries=50, seed=0).run(x[:8], y[:8])
    assert res.success.any()


# ------------------------------------------------------------------- FAB
def _linf_lp_min(t, w, b):
    """min ||d||_inf s.t. w·(t+d) = b, 0 <= t+d <= 1 by bisection on λ (closed form check)."""
    c = b - w @ t
    s = 1.0 if c >= 0 else -1.0
    room = torch.where(w * s > 0, 1 - t, t)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (w.abs() * torch.minimum(torch.full_like(room, mid), room)).sum() >= abs(c):
            hi = mid
        else:
            lo = mid
    return hi


def test_hyperplane_projection_linf_is_minimal():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(30, 12, generator=g)
    w = torch.randn(30, 12, generator=g)
    b = (w * t).sum(1) + 0.3 * torch.randn(30, generator=g)
    d = project_onto_hyperplane(t, w, b, "Linf")
    reach = (w * (t + d)).sum(1) - b
    for i in range(30):
        best = _linf_lp_min(t[i], w[i], b[i])
        if best < 1 - 1e-6:  # reachable inside the box
            assert abs(reach[i]) < 1e-4
            assert d[i].abs().max() <= best + 1e-4
    assert ((t + d) >= -1e-6).all() and ((t + d) <= 1 + 1e-6).all()


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_hyperplane_projection_l2_l1_unconstrained_closed_form(norm):
    # points in the middle of the box, hyperplane close: the box is not active and
    # the minimal step has the closed form |c| / ||w||_q (q the dual norm)
    g = torch.Generator().manual_seed(1)
    t = 0.5 + 0.01 * torch.rand(20, 8, generator=g)
    w = torch.randn(20, 8, generator=g)
    c = 0.01 * torch.randn(20, generator=g)
    b = (w * t).sum(1) + c
    d = project_onto_hyperplane(t, w, b, norm)
    assert torch.allclose((w * (t + d)).sum(1), b, atol=1e-5)
    if norm == "L2":
        assert torch.allclose(d.norm(dim=1), c.abs() / w.norm(dim=1), rtol=1e-4, atol=1e-7)
    else:
        assert torch.allclose(d.abs().sum(1), c.abs() / w.abs().amax(1), rtol=1e-4, atol=1e-7)


def test_fab_finds_the_minimal_linf_distance_of_a_linear_model():
    # linear classifier, points well inside the box: the minimal L∞ adversarial distance
    # is min_k (z_y - z_k) / ||w_y - w_k||_1 exactly
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 10, generator=g)
    bias = torch.randn(4, generator=g) * 0.1
    model = zoo.LinearModel(w, bias).eval()
    x = 0.5 + 0.05 * (torch.rand(40, 10, generator=g) - 0.5)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    diff = z.gather(1, y[:, None]) - z                    # z_y - z_k
    wn = (w[y][:, None, :] - w[None]).abs().sum(-1)       # ||w_y - w_k||_1
    dist = (diff / wn).scatter(1, y[:, None], math.inf).amin(1)
    keep = dist < 0.2  # stays inside [0, 1]
    res = FAB(model, norm="Linf", eps=1.0, steps=100, early_stop=False,
              allow_large_eps=True).run(x[keep], y[keep])   # unbounded: the minimum norm is the point
    found = res.extra["min_norm"]
    assert res.success.all()
    assert (found >= dist[keep] * (1 - 1e-4)).all()      # nothing beats the true minimum
    assert (found <= dist[keep] * 1.02).all()            # and FAB gets within 2% of it


def test_fabt_on_the_model(mnist):
    model, x, y = mnist
    x, y = x[:24], y[:24]
    res = FABT(model, eps=0.15, steps=20).run(x, y)
    d = (res.x_adv - x).flatten(1).abs().amax(1)
    assert (d[res.success] <= 0.15 + 1e-5).all()
    assert (d[~res.success] == 0).all()  # failures come back clean, as in the reference
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert res.success.float().mean() > 0.3
    # the minimal norms are a certificate of the attack's success radius
    mn = res.extra["min_norm"]
    assert (mn[res.success] <= 0.15 + 1e-5).all()


def test_fab_untargeted_l2(mnist):
    model, x, y = mnist
    res = FAB(model, norm="L2", eps=2.0, steps=20, n_restarts=2).run(x[:16], y[:16])
    d = (res.x_adv - x[:16]).flatten(1).norm(dim=1)
    assert (d[res.success] <= 2.0 + 1e-4).all()
    assert res.success.float().mean() > 0.5


def test_packed_key_row_sort_matches_torch_sort():
    from fastadv.attacks.fab import _sort_nonneg_rows
    g = torch.Generator().manual_seed(5)
    u = torch.rand(37, 301, generator=g)
    u[u < 0.4] = 0.0                      # many ties, as the room of a pixel at its bound
    u[0, :5] = -0.0                       # a negative zero sorts as zero
    u[1, 7] = 3.0e38
    u[2] = 1.0
    vals, idx = _sort_nonneg_rows(u)
    ref_vals, _ = u.sort(1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(u.gather(1, idx), vals) and idx.dtype == torch.int64
    # every row's indices are a permutation, ties in column order
    assert torch.equal(idx.sort(1).values, torch.arange(301).expand(37, 301))
    assert torch.equal(idx[2], torch.arange(301))
