"""The gradient-masking self-checks fire on models built to mask gradients, and stay quiet on a
normal one."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from fastadv.attacks import AutoAttack
from fastadv.eval import masking
from fastadv.eval.masking import GradientMaskingWarning


class Quantised(nn.Module):
    """A non-differentiable input layer (8-level quantisation) in front of a normal CNN:
    the input gradient is exactly zero, the model is not robust."""

    def __init__(self, inner, levels=8):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x):
        return self.inner(torch.round(x * self.levels) / self.levels)


class Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return F.softmax(self.inner(x), 1)


class Noisy(nn.Module):
    """Dropout kept on at test time: a randomised model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(F.dropout(x, 0.3, training=True))


@pytest.fixture(scope="module")
def mnist():
    model = zoo.mnist_cnn()
    _, (xt, yt) = zoo.mnist_split()
    with torch.no_grad():
        ok = model(xt[:80]).argmax(1) == yt[:80]
    return model, xt[:80][ok][:32], yt[:80][ok][:32]


def _fired(checks):
    return {c.name for c in checks if c.fired}


def test_quiet_on_a_normal_model(mnist):
    model, x, y = mnist
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        checks = masking.check_gradient_masking(model, x[:16], y[:16], eps=0.1, steps=(5, 15))
    assert _fired(checks) == set()
    assert {c.name for c in checks} == {"randomness", "softmax_output", "gradients", "large_eps", "more_effort"}


def test_quantised_input_layer_fires(mnist):
    model, x, y = mnist
    masked = Quantised(model).eval()
    with pytest.warns(GradientMaskingWarning) as rec:
        checks = masking.check_gradient_masking(masked, x[:16], y[:16], eps=0.1, steps=(5, 15))
    fired = _fired(checks)
    assert "gradients" in fired
    assert "large_eps" in fired       # the white-box attack cannot move even with the whole box
    assert any("zero input gradient" in str(r.message) for r in rec)


def test_square_beating_whitebox_fires_in_autoattack(mnist):
    model, x, y = mnist
    masked = Quantised(model).eval()
    aa = AutoAttack(masked, eps=0.3, steps=5, n_queries=100, seed=0)
    with pytest.warns(GradientMaskingWarning) as rec:
        aa.run_standard_evaluation(x[:12], y[:12])
    msgs = " ".join(str(r.message) for r in rec)
    assert "square_beats_whitebox" in msgs and "gradients" in msgs
    assert aa.last_result.extra["per_attack"]["square"].sum() > 0
    # on the normal model AutoAttack's own checks say nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        AutoAttack(model, eps=0.3, steps=5, n_queries=100, seed=0).run_standard_evaluation(x[:12], y[:12])


def test_softmax_and_randomness_fire(mnist):
    model, x, y = mnist
    with pytest.warns(GradientMaskingWarning, match="softmax"):
        assert masking.check_softmax_output(Softmaxed(model), x[:8]).fired
    with pytest.warns(GradientMaskingWarning, match="randomised"):
        assert masking.check_randomness(Noisy(model), x[:8]).fired
    assert not masking.check_softmax_output(model, x[:8], warn=False).fired
    assert not masking.check_randomness(model, x[:8], warn=False).fired


def test_more_effort_check_fires_when_stronger_is_worse(mnist, monkeypatch):
    # a fake APGD whose robust accuracy grows with the step count: the check must notice
    from fastadv.attacks import apgd as apgd_mod
    model, x, y = mnist

    class Fake:
        def __init__(self, model, norm, eps, steps, restarts, *a, **k):
            self.steps = steps

        def run(self, x, y):
            from fastadv.attacks.base import AttackResult
            n = len(x)
            k = n // 2 if self.steps < 50 else n // 4   # more steps fool fewer points
            s = torch.zeros(n, dtype=torch.bool)
            s[:k] = True
            return AttackResult(x, s, torch.zeros(n), torch.zeros(n, dtype=torch.long))

    monkeypatch.setattr(apgd_mod, "APGD", Fake)
    c = masking.check_more_effort(model, x[:16], y[:16], eps=0.1, steps=(10, 100), warn=False)
    assert c.fired and "higher robust accuracy" in c.reason
