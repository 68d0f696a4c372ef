"""fp16 loss scaling (fastadv.attacks._loss_scale): confident samples keep moving under
``amp="fp16"``, overflow backs a sample's scale off, underflow grows it, coupled rows share one.

CPU autocast runs fp16 in torch 2.13, so the model passes here are real fp16 passes.
"""
import pytest
import torch
from torch import nn

import fastadv
from fastadv.attacks import _loss_scale
from fastadv.attacks.base import preserved_model

import zoo


def _autocast_fp16_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16
    except (RuntimeError, TypeError):
        return False


pytestmark = pytest.mark.skipif(not _autocast_fp16_works(), reason="no fp16 CPU autocast in this torch")


@pytest.fixture(scope="module")
def confident():
    """The MNIST CNN with its last layer scaled so that the clean points kept have logit margins
    between 30 and 80: their cross-entropy gradient (~e^-margin) is far below fp16's smallest
    number at the old fixed scale of 1024, and well inside float32's range."""
    model, x, y = zoo.mnist_cnn_and_points(200)
    last = model.classifier[-1]
    with torch.no_grad():
        z = model(x)
        top = z.topk(2, 1).values
        margin = top[:, 0] - top[:, 1]
        right = z.argmax(1) == y
        k = 45.0 / float(margin[right].median())
        last.weight.mul_(k)
        last.bias.mul_(k)
        z = model(x)
        top = z.topk(2, 1).values
        margin = top[:, 0] - top[:, 1]
        keep = right & (margin > 30) & (margin < 80)
    x, y = x[keep][:24], y[keep][:24]
    assert len(x) == 24
    return model, x, y


def test_confident_samples_get_a_gradient_in_fp16(confident):
    model, x, y = confident
    kw = dict(eps=0.2, alpha=0.02, steps=10, random_start=False, channels_last=False)
    with preserved_model(model):
        _, _, g32 = fastadv.PGD(model, **kw).loss_and_grad(x, y)
        for state in (None, _loss_scale.new_state(len(x), x.device)):
            _, _, g16 = fastadv.PGD(model, amp="fp16", **kw).loss_and_grad(x, y, grad_scale=state)
            assert torch.isfinite(g16).all()
            rows = g16.flatten(1).ne(0).any(1)
            assert bool(rows.all()), f"{int((~rows).sum())} of {len(x)} samples got no gradient"
            # the same direction as float32's: signs agree where float32's entry is not tiny
            big = g32.abs() > 1e-3 * g32.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
            agree = (g16.sign() == g32.sign())[big].float().mean().item()
            assert agree > 0.97, agree


def test_fp16_pgd_moves_every_confident_sample_and_fools_as_many(confident):
    model, x, y = confident
    kw = dict(eps=0.2, alpha=0.02, steps=10, random_start=False, seed=0)
    ref = fastadv.PGD(model, **kw).run(x, y)
    res = fastadv.PGD(model, amp="fp16", **kw).run(x, y)      # used to raise: "does not depend on x"
    last = fastadv.PGD(model, amp="fp16", keep="last", **kw).run(x, y)
    moved = (last.x_adv - x).flatten(1).abs().amax(1) > 0
    assert bool(moved.all()), f"{int((~moved).sum())} samples never moved"
    assert int(res.success.sum()) >= int(ref.success.sum()) >= 1
    with torch.no_grad():                                       # figures are float32-exact
        assert torch.equal(res.success, model(res.x_adv).argmax(1) != y)


def test_fp16_apgd_keeps_a_running_scale(confident):
    """APGD passes no per-sample state: the attack keeps one running target per device."""
    model, x, y = confident
    ref = fastadv.APGD(model, eps=0.2, steps=10, seed=0).run(x, y)
    atk = fastadv.APGD(model, eps=0.2, steps=10, seed=0, amp="fp16")
    res = atk.run(x, y)
    assert int(res.success.sum()) >= int(ref.success.sum()) >= 1
    shared = atk._fp16_scale[x.device]
    assert shared.shape == (1,) and _loss_scale.MIN <= float(shared.abs()) <= _loss_scale.MAX


# --------------------------------------------------------------- the scale's dynamics
class _Shrink(torch.autograd.Function):
    """Identity forward; the backward multiplies the (fp16) gradient by ``f`` in its own dtype,
    so that it underflows unless the gradient arriving is large enough."""

    @staticmethod
    def forward(ctx, t, f):
        ctx.f = f
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.f, None


class _Chain(nn.Module):
    """x -> Linear (fp16 logits) whose backward multiplies the incoming gradient by ``f`` first:
    the backward's gain from the logits to the input is ~``f·gain``."""

    def __init__(self, f: float, gain: float = 1.0):
        super().__init__()
        self.f = f
        self.a = nn.Linear(12, 4)
        with torch.no_grad():
            self.a.weight.copy_(torch.linspace(-1, 1, 48).reshape(4, 12) * gain)
            self.a.bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))

    def forward(self, x):
        return _Shrink.apply(self.a(x), self.f)


def _pass(model, x, y, state, retries, independent=True):
    """One fp16 pass: (float32-exact reference gradient, scaled fp16 gradient)."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (g32,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y, reduction="sum"), x)
        with torch.autocast("cpu", dtype=torch.float16):
            z = model(x)
        zf = z.float()
        loss = nn.functional.cross_entropy(zf, y, reduction="none")
        g = _loss_scale.scaled_input_grad(z, zf, loss, x, state, independent=independent, retries=retries)
    return g32, g


def _data(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 12, generator=gen), torch.arange(n) % 4


def test_underflow_grows_the_scale_and_a_cpu_retry_recovers_the_step():
    model = _Chain(2.0 ** -36)   # at 2^10 the gradient leaving _Shrink is < 2^-25: 0 in fp16
    x, y = _data()
    state = _loss_scale.new_state(4, x.device)
    g32, g = _pass(model, x, y, state, retries=0)
    assert bool((g == 0).all())
    assert state.tolist() == [_loss_scale.INIT * 16] * 4            # all zero: x16 for the next pass
    g32, g = _pass(model, x, y, state, retries=0)                   # 2^14: representable
    assert bool(g.ne(0).any(1).all())
    assert bool((g.sign() == g32.sign())[g != 0].all())
    state = _loss_scale.new_state(4, x.device)                      # a CPU pass retries at once
    _, g = _pass(model, x, y, state, retries=3)
    assert bool(g.ne(0).any(1).all()) and state.tolist() == [_loss_scale.MAX] * 4


def test_overflow_backs_off_for_good_and_unscaling_is_exact():
    model = _Chain(1.0, gain=2.0 ** 7)   # input gradient ~2^7 x the logits': 3 rows overflow at 2^10
    x, y = _data()
    x = x * 0.1
    init, off = _loss_scale.INIT, -_loss_scale.INIT / 4
    state = _loss_scale.new_state(4, x.device)
    g32, g = _pass(model, x, y, state, retries=0)
    assert torch.isfinite(g).all()
    assert g.ne(0).any(1).tolist() == [False, False, False, True]   # they wait a step
    assert state.tolist() == [off, off, off, init]                  # backed off, marked
    tol = dict(rtol=2e-3, atol=2e-3 * float(g32.abs().max()))
    for _ in range(3):  # finite from now on, and never grown again
        g32, g = _pass(model, x, y, state, retries=0)
        torch.testing.assert_close(g, g32, **tol)
    assert state.tolist() == [off, off, off, init]
    state = _loss_scale.new_state(4, x.device)
    _, g = _pass(model, x, y, state, retries=3)                     # a CPU pass: redone at once
    torch.testing.assert_close(g, g32, **tol)
    assert state.tolist() == [off, off, off, init]


def test_small_gradients_grow_the_scale_up_to_max():
    model = _Chain(2.0 ** -16)
    x, y = _data()
    state = _loss_scale.new_state(4, x.device)
    for _ in range(8):
        g32, g = _pass(model, x, y, state, retries=0)
    assert state.tolist() == [_loss_scale.MAX] * 4
    assert bool((g.sign() == g32.sign())[g32.abs() > 1e-3 * g32.abs().max()].all())


def test_coupled_rows_share_one_scale():
    """BatchNorm in training mode couples the rows: per-row unscaling would weigh the other
    rows' terms by ratios of their scales, so every row gets the same one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.mul_(8.0)   # rows of very different confidence
    model.train()
    x, y = _data(6)
    state = _loss_scale.new_state(6, x.device)
    g32, g = _pass(model, x, y, state, retries=3, independent=False)
    assert len(set(state.tolist())) == 1
    torch.testing.assert_close(g, g32, rtol=2e-2, atol=2e-3 * float(g32.abs().max()))
    atk = fastadv.PGD(model, eps=0.1, steps=1, amp="fp16", model_mode="train")
    with preserved_model(model, "train"):
        assert not atk._rows_independent()
    with preserved_model(model, "eval"):
        assert atk._rows_independent()


def test_trainer_attack_path_scales_per_sample(confident):
    model, x, y = confident
    x = x[:8]
    y = y[:8]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = lambda z: nn.functional.cross_entropy(z.float(), y, reduction="sum")  # noqa: E731
    ref = fastadv.AdversarialTrainer(model, opt, method="pgd", eps=0.1, attack_amp="fp32")
    tr = fastadv.AdversarialTrainer(model, opt, method="pgd", eps=0.1, attack_amp="fp16")
    with preserved_model(model, "eval", freeze_params=False):
        g32, _ = ref.input_grad(x, loss_fn)
        g16, _ = tr.input_grad(x, loss_fn)
    assert bool(g16.flatten(1).ne(0).any(1).all())          # the old fixed 1024: all zero
    big = g32.abs() > 1e-3 * g32.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    assert (g16.sign() == g32.sign())[big].float().mean().item() > 0.97
    assert tr._attack_fp16_scale[x.device].shape == (1,)
