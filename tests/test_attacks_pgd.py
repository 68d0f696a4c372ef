"""FGSM / PGD / PGD-L2 on a real MNIST-trained CNN: strength against torchattacks on the same
points and budget, the threat model (ball and bounds), targets, restarts, early stop, amp."""
import pytest
import torch

import fastadv
import zoo

N = 400  # test points


@pytest.fixture(scope="module")
def mnist():
    model = zoo.mnist_cnn()
    (_, _), (xt, yt) = zoo.mnist_split()
    return model, xt[:N].clone(), yt[:N].clone()


def robust_acc(model, x_adv, y):
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def linf(a, b):
    return (a - b).flatten(1).abs().max(1).values


def l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


def torchattacks_run(cls_name, model, x, y, seed, **kw):
    """torchattacks draws its random start from the global RNG: seed it, then put it back."""
    ta = pytest.importorskip("torchattacks")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        atk = getattr(ta, cls_name)(model, **kw)
        return atk(x, y)


# ---------------------------------------------------------------- strength
@pytest.mark.parametrize("cls_name,eps,alpha", [("PGD", 0.1, 0.025), ("PGDL2", 1.5, 0.375)])
def test_at_least_as_strong_as_torchattacks_random_start(mnist, cls_name, eps, alpha):
    model, x, y = mnist
    fa, ta = [], []
    for seed in range(4):
        ta.append(robust_acc(model, torchattacks_run(cls_name, model, x, y, seed, eps=eps,
                                                     alpha=alpha, steps=10), y))
        res = getattr(fastadv, cls_name)(model, eps=eps, alpha=alpha, steps=10, seed=seed).run(x, y)
        fa.append(robust_acc(model, res.x_adv, y))
        assert abs(fa[-1] - res.robust_accuracy) <= 1.0 / N + 1e-9  # success matches the model
    fa_mean, ta_mean = sum(fa) / 4, sum(ta) / 4
    assert 0.3 < ta_mean < 0.95, "the budget should leave the comparison room either way"
    # Random starts differ between the two libraries' RNGs: with 2 seeds × 400 points the
    # difference of means had a standard error of ~0.5 pt even at equal strength (seen:
    # +0.75 pt once in three fresh-clone runs; 0.5 pt of slack left on models trained on
    # other CPUs). With 4 seeds it is ~0.35 pt and 1 pt is ~3 standard errors. The issue's
    # exact +0.5 pt bound is checked deterministically in the no-random-start test below.
    assert fa_mean <= ta_mean + 0.01, (fa, ta)


@pytest.mark.parametrize("cls_name,eps,alpha", [("PGD", 0.1, 0.025), ("PGDL2", 1.5, 0.375)])
def test_at_least_as_strong_as_torchattacks_no_random_start(mnist, cls_name, eps, alpha):
    model, x, y = mnist
    ta = robust_acc(model, torchattacks_run(cls_name, model, x, y, 0, eps=eps, alpha=alpha,
                                            steps=10, random_start=False), y)
    fa = getattr(fastadv, cls_name)(model, eps=eps, alpha=alpha, steps=10,
                                    random_start=False).run(x, y).robust_accuracy
    assert fa <= ta + 0.005, (fa, ta)


def test_fgsm_matches_torchattacks(mnist):
    model, x, y = mnist
    ta_x = torchattacks_run("FGSM", model, x, y, 0, eps=0.1)
    res = fastadv.FGSM(model, eps=0.1, keep="last", channels_last=False).run(x, y)
    # the same step: identical pixels but for sign flips of gradients within rounding of 0
    assert (res.x_adv == ta_x).float().mean().item() > 0.999
    best = fastadv.FGSM(model, eps=0.1, keep="best").run(x, y)
    # robust_accuracy is float32 arithmetic, robust_acc float64: compare to well below 1/N
    assert best.robust_accuracy <= robust_acc(model, ta_x, y) + 1e-6
    assert torch.equal(fastadv.fgsm(model, x, y, eps=0.1, keep="last", channels_last=False),
                       res.x_adv)


class _PassCounter(torch.nn.Module):
    """Rows the model saw with and without grad mode."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.rows = {True: 0, False: 0}

    def forward(self, x):
        self.rows[torch.is_grad_enabled()] += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("kw", [dict(), dict(early_stop=True), dict(max_batch=64)])
def test_fgsm_takes_the_clean_logits_from_its_gradient_pass(mnist, kw):
    model, x, y = mnist
    x, y = x[:200], y[:200]
    counted = _PassCounter(model).eval()
    res = fastadv.FGSM(counted, eps=0.1, **kw).run(x, y)
    # one gradient pass over the batch, one forward at the stepped points, and a few rows
    # of probes (input dependence, the chunk-size probe); no separate clean forward
    assert 200 <= counted.rows[True] < 200 + 16
    assert counted.rows[False] < 200 + 16  # was >= 396: a clean forward, then the final one
    # the same result as the loop computing its own first pass (a targeted run cannot
    # reuse it: its clean forward decides nothing here, but the path differs)
    ref = fastadv.PGD(model, eps=0.1, alpha=0.1, steps=1, random_start=False, **kw)
    ref.__dict__["_clean_logits"] = lambda xf, yy, t: fastadv.attacks.Attack._clean_logits(ref, xf, yy, t)
    res2 = ref.run(x, y)
    assert torch.equal(res.x_adv, res2.x_adv)
    assert torch.equal(res.success, res2.success)
    # a random start or amp keeps the separate exact clean forward
    counted.rows = {True: 0, False: 0}
    fastadv.PGD(counted, eps=0.1, alpha=0.1, steps=1, seed=0).run(x, y)
    assert counted.rows[False] >= 400


def test_restarts_and_early_stop_never_weaker(mnist):
    model, x, y = mnist
    x, y = x[:200], y[:200]
    kw = dict(eps=0.1, alpha=0.025, steps=10, seed=3, keep="best")  # the evaluation setting
    one = fastadv.PGD(model, **kw).run(x, y)
    ten = fastadv.PGD(model, restarts=10, **kw).run(x, y)
    stop = fastadv.PGD(model, early_stop=True, **kw).run(x, y)
    n_one, n_ten = int(one.success.sum()), int(ten.success.sum())
    assert n_ten >= n_one  # restarts never lose a point (the worst case is kept per sample)
    # Early stop runs the same trajectories, but on a shrinking batch, whose convolutions
    # round differently: allow two samples of rounding-driven divergence either way.
    n_stop = int(stop.success.sum())
    assert n_stop >= n_one - 2
    # early stop spends fewer steps on fooled samples and all K on robust ones
    assert stop.steps.float().mean() < 0.9 * one.steps.float().mean()
    assert bool((stop.steps[~stop.success] == 10).all())
    assert bool((one.steps == 10).all()) and bool((ten.steps == 100).all())
    ten_stop = fastadv.PGD(model, restarts=10, early_stop=True, **kw).run(x, y)
    # counts of fooled points, not float accuracies (0.695 + 0.01 < 0.705 in float32)
    n_ten_stop = int(ten_stop.success.sum())
    assert n_ten_stop >= n_one
    assert n_ten_stop >= n_ten - 3
    # a sample fooled by one restart leaves every restart's batch at once
    assert ten_stop.steps[ten_stop.success].float().mean() < 0.6 * 100
    for r in (one, ten, stop, ten_stop):
        assert linf(r.x_adv, x).max() <= 0.1 + 1e-6


def test_early_stop_is_the_same_attack_without_rounding(mnist):
    """With a per-sample computation that does not depend on the batch size (a linear
    model), early stop returns exactly the no-early-stop result."""
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        w = torch.randn(10, 784, generator=torch.Generator().manual_seed(0))
        lin[1].weight.copy_(w * 0.05)
        lin[1].bias.zero_()
    _, x, y = mnist
    x = x[:200]
    with torch.no_grad():
        y = lin(x).argmax(1)
    kw = dict(eps=0.01, alpha=0.0025, steps=10, seed=1, keep="best")  # early stop's own
    full = fastadv.PGD(lin, **kw).run(x, y)
    stop = fastadv.PGD(lin, early_stop=True, **kw).run(x, y)
    assert torch.equal(full.success, stop.success)
    assert 0.1 < stop.success.float().mean() < 0.9
    assert torch.equal(full.x_adv[~full.success], stop.x_adv[~stop.success])


def test_early_stop_cpu_passes_are_the_same_attack(mnist, monkeypatch):
    """On a CPU, early stop keeps one active set over all rows and runs the model in
    cache-sized passes: with a batch-size-independent model, the result is exactly that of
    one pass over everything, restarts included."""
    from fastadv.attacks import _engine
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        lin[1].weight.copy_(torch.randn(10, 784, generator=torch.Generator().manual_seed(0)) * 0.05)
        lin[1].bias.zero_()
    _, x, y = mnist
    x = x[:150]
    with torch.no_grad():
        y = lin(x).argmax(1)
    kw = dict(eps=0.01, alpha=0.0025, steps=10, seed=1, restarts=3, early_stop=True)
    whole = fastadv.PGD(lin, **kw).run(x, y)
    passes = []
    real = _engine.StepLoop._loss_and_grad

    def spy(self, xa, *a):
        passes.append((self.pass_rows, xa.shape[0]))
        return real(self, xa, *a)

    monkeypatch.setattr(_engine, "auto_max_rows", lambda *a, **k: 32)
    monkeypatch.setattr(_engine.StepLoop, "_loss_and_grad", spy)
    chunked = fastadv.PGD(lin, **kw).run(x, y)
    assert passes and all(p == 32 for p, _ in passes)
    assert passes[0][1] == 3 * 150                      # one active set: every restart of every point
    assert torch.equal(whole.success, chunked.success)
    assert torch.equal(whole.x_adv, chunked.x_adv) and torch.equal(whole.steps, chunked.steps)
    assert 0.1 < whole.success.float().mean() < 0.9


def test_best_iterate_not_last(mnist):
    model, x, y = mnist
    kw = dict(eps=0.1, alpha=0.05, steps=10, random_start=False)  # big steps oscillate
    best = fastadv.PGD(model, keep="best", **kw).run(x, y)
    last = fastadv.PGD(model, **kw).run(x, y)                   # the default: torchattacks'
    assert last.x_adv.equal(fastadv.PGD(model, keep="last", **kw)(x, y))
    assert bool((best.success | ~last.success).all())          # every success kept
    fail = ~best.success
    assert bool((best.loss[fail] >= last.loss[fail] - 1e-5).all())
    # never worse than the last iterate (equal when no success is lost by oscillation)
    assert best.robust_accuracy <= last.robust_accuracy


def test_best_iterate_with_keep_last_matches_trajectory(mnist):
    """keep='last' with no random start is torchattacks' PGD exactly (same iterates)."""
    model, x, y = mnist
    ta_x = torchattacks_run("PGD", model, x, y, 0, eps=0.1, alpha=0.025, steps=5,
                            random_start=False)
    fa_x = fastadv.PGD(model, eps=0.1, alpha=0.025, steps=5, random_start=False, keep="last",
                       channels_last=False)(x, y)
    assert (fa_x == ta_x).float().mean().item() > 0.99


# ------------------------------------------------------------ threat model
@pytest.mark.parametrize("cls_name", ["FGSM", "PGD", "PGDL2"])
def test_eps_zero_returns_x(mnist, cls_name):
    model, x, y = mnist
    kw = {} if cls_name == "FGSM" else dict(steps=3, restarts=2)
    res = getattr(fastadv, cls_name)(model, eps=0.0, **kw).run(x[:64], y[:64])
    assert torch.equal(res.x_adv, x[:64])


@pytest.mark.parametrize("options", [
    dict(), dict(restarts=3), dict(early_stop=True), dict(amp="bf16"), dict(loss="cw"),
    dict(loss="dlr"), dict(max_batch=50, restarts=2), dict(channels_last=False),
    dict(amp="bf16", early_stop=True, restarts=2),
])
def test_outputs_inside_ball_and_bounds(mnist, options):
    model, x, y = mnist
    x, y = x[:128], y[:128]
    for cls, eps, dist in ((fastadv.PGD, 0.2, linf), (fastadv.PGDL2, 2.0, l2)):
        res = cls(model, eps=eps, alpha=eps / 4, steps=5, seed=0, **options).run(x, y)
        assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
        assert dist(res.x_adv, x).max().item() <= eps + 1e-6
        assert res.x_adv.min().item() >= 0.0 and res.x_adv.max().item() <= 1.0
        assert res.success.shape == (128,) and res.success.dtype == torch.bool
        assert res.loss.dtype == torch.float32 and res.steps.dtype == torch.int64


def test_custom_bounds_and_normalization(mnist):
    model, x, y = mnist
    x, y = x[:128], y[:128]
    mean, std = 0.1307, 0.3081

    class Normalized(torch.nn.Module):  # a model trained on normalized input
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, z):
            return self.inner(z * std + mean)

    wrapped = Normalized().eval()
    plain = fastadv.PGD(model, eps=0.1, alpha=0.025, steps=5, random_start=False).run(x, y)
    norm = fastadv.PGD(wrapped, eps=0.1, alpha=0.025, steps=5, random_start=False,
                       normalization=([mean], [std])).run(x, y)
    assert abs(plain.robust_accuracy - norm.robust_accuracy) <= 0.02
    assert linf(norm.x_adv, x).max() <= 0.1 + 1e-6
    # a narrower box is respected
    res = fastadv.PGD(model, eps=0.3, steps=3, lower=0.0, upper=0.9).run(x.clamp(max=0.9), y)
    assert res.x_adv.max() <= 0.9
    with pytest.raises(ValueError, match="normalization"):
        fastadv.PGD(wrapped, eps=0.1, steps=1).run((x - mean) / std, y)
    with pytest.raises(TypeError, match="normalization"):
        fastadv.PGD(wrapped, eps=0.1, normalization=[mean])
    with pytest.raises(ValueError, match="std"):
        fastadv.PGD(wrapped, eps=0.1).set_normalization_used([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="std"):
        fastadv.PGD(wrapped, eps=0.1).set_normalization_used([0.1], [0.0])


@pytest.mark.parametrize("cls_name,eps,alpha", [("PGD", 0.1, 0.025), ("PGDL2", 1.5, 0.4)])
def test_set_normalization_used_is_torchattacks_drop_in(mnist, cls_name, eps, alpha):
    """torchattacks 3.5: with set_normalization_used, the attack takes and returns
    *normalized* inputs while eps/alpha/the [0, 1] box are pixel-space. The same call on
    fastadv gives the same x_adv (no random start: both deterministic)."""
    ta = pytest.importorskip("torchattacks")
    model, x, y = mnist
    x, y = x[:64], y[:64]
    mean, std = [0.1307], [0.3081]

    class Normalized(torch.nn.Module):  # a model trained on normalized input
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, z):
            return self.inner(z * std[0] + mean[0])

    wrapped = Normalized().eval()
    xn = (x - mean[0]) / std[0]
    ref = getattr(ta, cls_name)(wrapped, eps=eps, alpha=alpha, steps=5, random_start=False)
    ref.set_normalization_used(mean, std)
    ours = getattr(fastadv, cls_name)(wrapped, eps=eps, alpha=alpha, steps=5, random_start=False,
                                      keep="last", channels_last=False)
    ours.set_normalization_used(mean, std)
    a, b = ref(xn, y), ours(xn, y)
    assert b.shape == xn.shape and b.dtype == xn.dtype
    # the outputs are normalized: back in pixel space they sit in the ball and the box
    pix = b * std[0] + mean[0]
    dist = linf if cls_name == "PGD" else l2
    assert dist(pix, x).max().item() <= eps + 1e-5
    assert pix.min().item() >= -1e-6 and pix.max().item() <= 1 + 1e-6
    # same iterates as torchattacks, up to float rounding on a few sign flips
    close = ((a - b).abs().flatten(1).amax(1) <= 1e-4).float().mean().item()
    assert close >= 0.9, close
    with torch.no_grad():
        assert (wrapped(a).argmax(1) != y).sum().item() <= (wrapped(b).argmax(1) != y).sum().item() + 1


# ------------------------------------------------------------------ targets
def _check_targets(model, res, target, min_rate):
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == target)
    assert res.success.float().mean().item() >= min_rate


def test_targeted_modes_reach_targets(mnist):
    model, x, y = mnist
    x, y = x[:200], y[:200]
    kw = dict(eps=0.3, alpha=0.06, steps=10, seed=0)
    tgt = (y + 1) % 10
    res = fastadv.PGD(model, **kw).run(x, y, target=tgt)            # target= argument
    _check_targets(model, res, tgt, 0.85)
    atk = fastadv.PGD(model, **kw)
    atk.set_mode_targeted_by_label(quiet=True)                       # labels are the targets
    res = atk.run(x, tgt)
    _check_targets(model, res, tgt, 0.85)
    atk = fastadv.PGD(model, **kw)
    atk.set_mode_targeted_random(quiet=True)
    res = atk.run(x, y)
    t = res.extra["target"]
    assert bool((t != y).all()) and t.unique().numel() == 10
    _check_targets(model, res, t, 0.85)
    atk = fastadv.PGD(model, **kw)
    atk.set_mode_targeted_least_likely(quiet=True)
    res = atk.run(x, y)
    with torch.no_grad():   # the least likely class other than the label (torchattacks')
        ll = model(x).scatter(1, y[:, None], float("inf")).argmin(1)
    assert torch.equal(res.extra["target"], ll)
    _check_targets(model, res, ll, 0.6)
    l2res = fastadv.PGDL2(model, eps=4.0, alpha=1.0, steps=10, seed=0).run(x, y, target=tgt)
    _check_targets(model, l2res, tgt, 0.8)
    atk = fastadv.PGD(model, **kw)
    atk.set_mode_targeted_random(quiet=True)
    atk.set_mode_default()
    assert atk.run(x, y).extra["target"] is None


def test_other_losses_are_attacks(mnist):
    model, x, y = mnist
    x, y = x[:200], y[:200]
    kw = dict(eps=0.15, alpha=0.03, steps=10, seed=0)
    ce = fastadv.PGD(model, **kw).run(x, y)
    cw = fastadv.PGD(model, loss="cw", **kw).run(x, y)
    dlr = fastadv.PGD(model, loss="dlr", **kw).run(x, y)
    clean = robust_acc(model, x, y)
    assert cw.robust_accuracy <= ce.robust_accuracy + 0.03
    # DLR is scale-free and made for APGD's step-size schedule; with PGD's fixed steps it
    # is a real attack but a little weaker than CE on this model
    assert dlr.robust_accuracy <= clean - 0.3
    for r in (cw, dlr):
        assert abs(r.robust_accuracy - robust_acc(model, r.x_adv, y)) <= 1.0 / 200 + 1e-9


# ----------------------------------------------------------------------- amp
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_keeps_strength(mnist, amp):
    model, x, y = mnist
    kw = dict(eps=0.1, alpha=0.025, steps=10, seed=0)
    ref = fastadv.PGD(model, **kw).run(x, y).robust_accuracy
    res = fastadv.PGD(model, amp=amp, **kw).run(x, y)
    assert res.x_adv.dtype == torch.float32
    assert res.robust_accuracy <= ref + 0.03
    # the reported figures are exact float32 ones
    assert abs(res.robust_accuracy - robust_acc(model, res.x_adv, y)) <= 1.0 / N + 1e-9
    stop = fastadv.PGD(model, amp=amp, early_stop=True, **kw).run(x, y)
    assert abs(stop.robust_accuracy - robust_acc(model, stop.x_adv, y)) <= 1.0 / N + 1e-9


class _Overflowing(torch.nn.Module):
    """A linear model whose fp16 logits overflow for bright images and not for dark ones."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(28 * 28, 10)
        with torch.no_grad():
            self.lin.weight.copy_(torch.linspace(-1, 1, 10)[:, None] * 100.0)
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_fp16_overflow_never_moves_a_pixel():
    from fastadv.attacks import _loss_scale
    model = _Overflowing().eval()
    x = torch.zeros(4, 1, 28, 28)
    x[0] = 0.9                      # 100 * 0.9 * 784 > 65504: inf logits in fp16, every step
    x[1, :, :2, :2] = 0.05          # small: finite logits
    x[2, :, 10:12, 10:12] = 0.1
    x[3] = 0.95
    y = torch.full((4,), 9)        # what the model predicts: every sample is to be attacked
    atk = fastadv.PGD(model, eps=0.05, alpha=0.01, steps=8, random_start=False, amp="fp16",
                      channels_last=False)
    ref = fastadv.PGD(model, eps=0.05, alpha=0.01, steps=8, random_start=False,
                      channels_last=False)
    with fastadv.attacks.preserved_model(model):
        _, _, g32 = ref.loss_and_grad(x, y, None)
        scale = _loss_scale.new_state(4, x.device)
        loss, _, g = atk.loss_and_grad(x, y, None, grad_scale=scale)
        assert torch.isfinite(g).all()
        # inf logits in the forward: no gradient, a NaN loss (never a best iterate), and the
        # loss scale is left alone (no scale can help a forward that overflows)
        assert bool((g[0] == 0).all()) and bool((g[3] == 0).all())
        assert bool(torch.isnan(loss[[0, 3]]).all()) and bool(torch.isfinite(loss[1:3]).all())
        assert scale[0] == scale[3] == _loss_scale.INIT
        torch.testing.assert_close(g[1:3], g32[1:3], rtol=2e-2, atol=3e-3)
        # a scale target so large that the backward overflows even after the CPU's retries:
        # the sample waits a step, its target backs off and is marked (negative) not to grow
        scale = torch.full((4,), 2.0 ** 20)
        _, _, g = atk.loss_and_grad(x, y, None, grad_scale=scale)
        assert torch.isfinite(g).all() and bool((g[1] == 0).all())
        assert -2.0 ** 14 < scale[1] < 0
        _, _, g = atk.loss_and_grad(x, y, None, grad_scale=scale)   # the next step moves
        torch.testing.assert_close(g[1:3], g32[1:3], rtol=2e-2, atol=3e-3)
        assert scale[1] < 0
    with pytest.warns(RuntimeWarning, match=r"non-finite logits .* for 2 of 4 inputs.*amp='fp16'"):
        res = atk.run(x, y)
    assert torch.equal(res.x_adv[0], x[0]) and torch.equal(res.x_adv[3], x[3])
    assert not torch.equal(res.x_adv[1], x[1])                  # the others do move
    assert res.extra["nonfinite"].tolist() == [True, False, False, True]


# ------------------------------------------------------------ functional API
def test_functional_forms_match_classes(mnist):
    model, x, y = mnist
    x, y = x[:64], y[:64]
    assert torch.equal(fastadv.pgd(model, x, y, eps=0.1, alpha=0.02, steps=4, seed=5),
                       fastadv.PGD(model, eps=0.1, alpha=0.02, steps=4, seed=5)(x, y))
    assert torch.equal(fastadv.pgd_l2(model, x, y, eps=1.0, alpha=0.2, steps=4, seed=5),
                       fastadv.PGDL2(model, eps=1.0, alpha=0.2, steps=4, seed=5)(x, y))
    assert torch.equal(fastadv.fgsm(model, x, y, eps=0.1), fastadv.FGSM(model, eps=0.1)(x, y))
    tgt = (y + 3) % 10
    assert torch.equal(fastadv.pgd(model, x, y, eps=0.1, steps=2, seed=1, target=tgt),
                       fastadv.PGD(model, eps=0.1, steps=2, seed=1)(x, y, tgt))


def test_constructor_signature_matches_torchattacks():
    import inspect
    ta = pytest.importorskip("torchattacks")
    for name in ("FGSM", "PGD", "PGDL2"):
        ours = inspect.signature(getattr(fastadv, name).__init__).parameters
        theirs = inspect.signature(getattr(ta, name).__init__).parameters
        pos = [p for p in theirs if p != "self"]
        assert list(ours)[1:len(pos) + 1] == pos
        for p in pos:
            assert ours[p].default == theirs[p].default, (name, p)


def test_channels_last_input_and_output_layout(mnist):
    model, x, y = mnist
    xc = x[:32].contiguous(memory_format=torch.channels_last)
    out = fastadv.PGD(model, eps=0.1, steps=2, seed=0)(xc, y[:32])
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = fastadv.PGD(model, eps=0.1, steps=2, seed=0)(x[:32], y[:32])
    assert out.is_contiguous()
    same = fastadv.PGD(model, eps=0.1, steps=2, seed=0, channels_last=False)(x[:32], y[:32])
    assert (out == same).float().mean() > 0.99  # same math, another memory layout


def test_empty_batch(mnist):
    model, x, y = mnist
    for cls in (fastadv.PGD, fastadv.PGDL2, fastadv.FGSM):
        res = cls(model).run(x[:0], y[:0])
        assert res.x_adv.shape == (0, 1, 28, 28) and res.success.shape == (0,)


def test_digits_model_attack():
    model = zoo.digits_cnn()
    (_, _), (xt, yt) = zoo.digits_split()
    clean = robust_acc(model, xt, yt)
    assert clean > 0.95
    res = fastadv.PGD(model, eps=0.1, alpha=0.025, steps=10, seed=0).run(xt, yt)
    assert res.robust_accuracy < clean - 0.2
    assert linf(res.x_adv, xt).max() <= 0.1 + 1e-6
