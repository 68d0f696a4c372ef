"""Attacks give the model back exactly as found and never touch the global RNG; bad input
gets a clear error naming the problem."""
import pytest
import torch
from torch import nn

import fastadv
import zoo


def _snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "buffers": [b.clone() for b in model.buffers()],
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "req": [p.requires_grad for p in model.parameters()],
    }


def _assert_same(model, snap):
    assert [m.training for m in model.modules()] == snap["training"]
    for b, s in zip(model.buffers(), snap["buffers"]):
        assert torch.equal(b, s)                              # bitwise
    for p, s in zip(model.parameters(), snap["params"]):
        assert torch.equal(p.detach(), s)
    for p, g, gv in zip(model.parameters(), snap["grads"], snap["grad_values"]):
        assert p.grad is g                                    # the very same tensor
        if g is not None:
            assert torch.equal(p.grad, gv)
    assert [p.requires_grad for p in model.parameters()] == snap["req"]


@pytest.fixture(scope="module")
def data():
    (_, _), (xt, yt) = zoo.mnist_split()
    return xt[:96].clone(), yt[:96].clone()


def _prepared_model():
    """BatchNorm + dropout, in train mode, with some .grad set and a frozen layer."""
    model = zoo.mnist_cnn_bn().train()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    params[-1].grad = torch.randn(params[-1].shape, generator=torch.Generator().manual_seed(0))
    params[1].requires_grad_(False)
    model.features[1].eval()   # a mixed-mode model
    return model


def _targeted_random(atk):
    atk.set_mode_targeted_random(quiet=True)   # returns None, as torchattacks' setter
    return atk


@pytest.mark.parametrize("make", [
    lambda m: fastadv.PGD(m, eps=0.1, steps=3, seed=0),
    lambda m: fastadv.PGD(m, eps=0.1, steps=3, restarts=3, early_stop=True),
    lambda m: fastadv.PGD(m, eps=0.1, steps=3, amp="bf16", max_batch=40, restarts=2),
    lambda m: fastadv.PGD(m, eps=0.1, steps=3, model_mode="train"),    # BN stats + dropout RNG
    lambda m: fastadv.PGDL2(m, eps=1.0, steps=3, model_mode="keep", loss="cw"),
    lambda m: fastadv.FGSM(m, eps=0.1),
    lambda m: _targeted_random(fastadv.PGD(m, eps=0.1, steps=3)),
    lambda m: fastadv.MultiAttack([fastadv.PGD(m, eps=0.05, steps=2), fastadv.FGSM(m, eps=0.1)]),
])
def test_model_and_rng_left_exactly_as_found(data, make):
    x, y = data
    model = _prepared_model()
    snap = _snapshot(model)
    rng = torch.get_rng_state()
    res = make(model).run(x, y)
    assert torch.equal(torch.get_rng_state(), rng)           # neither consumed nor reseeded
    _assert_same(model, snap)
    assert res.x_adv.shape == x.shape


def test_error_inside_attack_still_restores(data):
    x, y = data
    model = _prepared_model()
    snap = _snapshot(model)

    def boom(logits, y, target):
        raise RuntimeError("boom")

    atk = fastadv.PGD(model, eps=0.1, steps=2)
    atk.attack_loss = boom
    with pytest.raises(RuntimeError, match="boom"):
        atk.run(x, y)
    _assert_same(model, snap)


def test_own_generator_reproducible(data):
    x, y = data
    model = zoo.mnist_cnn()
    a = fastadv.PGD(model, eps=0.1, steps=2, seed=7)(x, y)
    b = fastadv.PGD(model, eps=0.1, steps=2, seed=7)(x, y)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c = fastadv.PGD(model, eps=0.1, steps=2, generator=g1)(x, y)
    d = fastadv.PGD(model, eps=0.1, steps=2, generator=g2)(x, y)
    assert torch.equal(c, d) and not torch.equal(a, c)
    # the global seed has no say in it
    torch.manual_seed(123)
    e = fastadv.PGD(model, eps=0.1, steps=2, seed=7)(x, y)
    assert torch.equal(a, e)


def test_parameters_grad_untouched_by_input_gradients(data):
    x, y = data
    model = zoo.mnist_cnn()
    for p in model.parameters():
        assert p.grad is None and p.requires_grad
    fastadv.PGD(model, eps=0.1, steps=2)(x, y)
    for p in model.parameters():
        assert p.grad is None and p.requires_grad


# ------------------------------------------------------------------ bad input
class _Const(nn.Module):
    def __init__(self, detach=False, zero=False):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(10))
        self.detach, self.zero = detach, zero

    def forward(self, x):
        if self.zero:  # depends on x in the graph, but with a zero derivative
            return self.bias + 0.0 * x.flatten(1).sum(1, keepdim=True)
        return self.bias.expand(x.shape[0], 10)


class _Round(nn.Module):  # piecewise constant: zero gradient almost everywhere
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(784, 10)

    def forward(self, x):
        return self.lin((x * 4).round().flatten(1))


class _NaN(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] / 0.0


@pytest.mark.parametrize("model,match", [
    (_Const(), "does not depend on the input x"),
    (_Const(zero=True), "input gradient is zero"),
    (_Round(), "input gradient is zero"),
    (_NaN(), "non-finite logits"),
])
def test_broken_models_rejected(data, model, match):
    x, y = data
    for kw in (dict(), dict(early_stop=True)):
        with pytest.raises(ValueError, match=match):
            fastadv.PGD(model, eps=0.1, steps=2, random_start=False, **kw).run(x, y)


def test_bad_inputs_rejected(data):
    x, y = data
    model = zoo.mnist_cnn()
    atk = fastadv.PGD(model, eps=0.1, steps=1)
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 9\]"):
        atk(x, torch.full_like(y, 10))
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 9\]"):
        atk(x, torch.full_like(y, -1))
    with pytest.raises(ValueError, match="y: expected shape"):
        atk(x, y[:-1])
    with pytest.raises(ValueError, match=r"x: expected values in \[lower, upper\]"):
        atk(x * 2.0, y)
    with pytest.raises(ValueError, match="x: expected finite"):
        atk(torch.full_like(x, float("nan")), y)
    with pytest.raises(TypeError, match="y: expected integer"):
        atk(x, y.float())
    with pytest.raises(ValueError, match="target: expected labels"):
        atk(x, y, torch.full_like(y, 12))
    with pytest.raises(ValueError, match="eps: expected a finite value >= 0"):
        fastadv.PGD(model, eps=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        fastadv.PGD(model, alpha=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        fastadv.PGD(model, steps=-1)
    with pytest.raises(ValueError, match="restarts"):
        fastadv.PGD(model, restarts=3, random_start=False)
    with pytest.raises(ValueError, match="amp"):
        fastadv.PGD(model, amp="fp8")
    with pytest.raises(ValueError, match="loss"):
        fastadv.PGD(model, loss="mse")
    with pytest.raises(ValueError, match="backend"):
        fastadv.PGD(model, backend="opencl")
    with pytest.raises(TypeError, match="FGSM: unexpected keyword 'steps'"):
        fastadv.FGSM(model, steps=3)


def test_cuda_graph_on_cpu_warns_and_runs(data):
    x, y = data
    model = zoo.mnist_cnn()
    atk = fastadv.PGD(model, eps=0.1, steps=2, seed=0, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="cuda_graph=True ignored"):
        out = atk(x, y)
    assert torch.equal(out, fastadv.PGD(model, eps=0.1, steps=2, seed=0)(x, y))
