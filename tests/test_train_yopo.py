"""YOPO-m-n against an independent implementation of Zhang et al. 2019's Algorithm 1."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv import data, models
from fastadv.train import AdversarialTrainer
from fastadv.train.methods import check_first_layer


def _setup(seed=0):
    x, y = data.load_digits()
    torch.manual_seed(seed)
    model = models.SmallCNN(width=4, input_size=8)     # conv -> Identity -> ReLU(inplace=True)
    g = torch.Generator().manual_seed(seed)
    x, y = x[:32], y[:32]
    eps = 0.1
    x0 = (x + torch.empty_like(x).uniform_(-eps, eps, generator=g)).clamp(0, 1)
    return model, x, y, x0, eps


def _reference(model, x, y, x0, m, n, alpha, eps, chain):
    """Algorithm 1, written out: the m full passes at η^{j,0} train the other layers; the
    first layer's gradient is ∇θ₀⟨p_j, f₀(x + η^{j,n})⟩ with p_j = ∂ℓ/∂f₀ of pass j."""
    net = copy.deepcopy(model)
    for mod in net.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False                            # no in-place surprises here
    conv = net.features[0]
    if chain:   # f₀ = ReLU(conv(·))
        f0, rest = (lambda u: F.relu(conv(u))), nn.Sequential(*net.features[3:], net.classifier)
    else:       # f₀ = conv
        f0, rest = conv, nn.Sequential(*net.features[1:], net.classifier)
    first = [conv.weight, conv.bias]
    others = [q for q in net.parameters() if all(q is not f for f in first)]
    g_first = [torch.zeros_like(q) for q in first]
    g_other = [torch.zeros_like(q) for q in others]
    xa = x0.clone()
    for _ in range(m):
        h = f0(xa)
        h.retain_grad()
        loss = F.cross_entropy(rest(h), y) / m
        for acc, g in zip(g_other, torch.autograd.grad(loss, others, retain_graph=True)):
            acc += g
        (p,) = torch.autograd.grad(loss, h)
        for _ in range(n):
            xi = xa.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f0(xi), xi, grad_outputs=p)
            xa = torch.min(torch.max(xa + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        for acc, g in zip(g_first, torch.autograd.grad(f0(xa), first, grad_outputs=p)):
            acc += g
    lr = 1.0
    expected = {}
    for q, g in zip(first + others, g_first + g_other):
        expected[id(q)] = (q - lr * g).detach()
    return [expected[id(q)] for q in net.parameters()]


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("m,n", [(2, 2), (3, 1)])
def test_yopo_matches_algorithm_1(chain, m, n):
    model, x, y, x0, eps = _setup()
    alpha = 0.03
    want = _reference(model, x, y, x0, m, n, alpha, eps, chain)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    kw = {"first_layer": ["features.0", "features.1", "features.2"]} if chain else {}
    tr = AdversarialTrainer(model, opt, "yopo", eps=eps, alpha=alpha, steps=n, outer=m, seed=0, **kw)
    tr.random_start = lambda xx, r: x0.clone()             # the same η^{1,0} as the reference
    tr.step(x, y)
    for got, exp in zip(model.parameters(), want):
        assert torch.allclose(got, exp, atol=1e-5, rtol=1e-4), (got - exp).abs().max()


def test_yopo_adjoint_survives_inplace_relu():
    """The first layer is followed by ReLU(inplace=True): the adjoint must be ∂ℓ/∂conv(x)
    (ReLU's mask applied), not the gradient w.r.t. the ReLU output."""
    model, x, y, x0, eps = _setup()
    tr = AdversarialTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "yopo", eps=eps, seed=0)
    tr.step(x, y)                                          # attaches the tap
    tap = tr._method.tap
    with tap.capture():
        loss = F.cross_entropy(model(x0), y, reduction="sum")
        loss.backward()
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    h = ref.features[0](x0)
    (p_true,) = torch.autograd.grad(F.cross_entropy(
        nn.Sequential(*ref.features[1:], ref.classifier)(h), y, reduction="sum"), h)
    assert tap.p is not None
    assert torch.allclose(tap.p, p_true, atol=1e-6)
    assert (tap.p[h <= 0] == 0).all()


def test_first_layer_chain_must_be_complete():
    """A chain of modules is checked like a single first layer: skipping the ReLU between
    the conv and the pooling is not the model's computation."""
    model, x, y, _, eps = _setup()
    check_first_layer(model, nn.Sequential(model.features[0], model.features[2]), x[:4], y[:4],
                      tap=model.features[2])             # Identity left out: the same function
    tr = AdversarialTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "yopo", eps=eps,
                            first_layer=["features.0", "features.3"], seed=0)
    with pytest.raises(ValueError, match="first layer"):
        tr.step(x, y)
