"""One behaviour on every backend: the edge cases where backends used to part ways.

Property tests over every ready CPU backend (torch, cpp, triton under the interpreter):
the same answer or the same clear error for

- ``random_init`` on an ``x_nat`` that requires grad (the start never does);
- ``alpha``/``eps`` beyond float32's range (1e300, a float64 tensor of 1e300, 10**400),
  which saturate at float32's largest value; bounds beyond it round to ±inf;
- in-place inputs that overlap the written tensor (``x_nat = buf[k:]``, ``x_adv = buf[:-k]``),
  computed as if every input were read first;
- in-place writes into an inference tensor: refused outside inference mode, done inside.
"""
import math

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st

from fastadv import ops
from fastadv.ops import reference as ref

F32_MAX = float(torch.finfo(torch.float32).max)
READY = [name for name in ("torch", "cpp", "triton") if ops.backends()[name] is True]
STEPS = ("linf_step", "l2_step")
NAMES = ("linf_step", "l2_step", "linf_project", "l2_project")
# the interpreter costs ~0.1-0.3 s a call: keep triton's share of the examples small
# (and no shrinking, which would rerun triton for minutes).
FEW = settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


def _data(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(b, n, generator=g)
    x_adv = (x_nat + 0.3 * torch.randn(b, n, generator=g)).clamp(0, 1)
    grad = torch.randn(b, n, generator=g)
    grad[torch.rand(b, n, generator=g) < 0.2] = 0.0
    return x_adv, x_nat, grad


def _call(name, x_adv, x_nat, grad, alpha, eps, backend, inplace=False, **kw):
    fn = getattr(ops, name + ("_" if inplace else ""))
    if name in STEPS:
        return fn(x_adv, x_nat, grad, alpha, eps, backend=backend, **kw)
    return fn(x_adv, x_nat, eps, backend=backend, **kw)


def _close(a, b, name):
    """linf ops bit for bit; L2 ops within 1e-6 of the [0, 1] range (the ops contract)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    a, b = a.nan_to_num(0), b.nan_to_num(0)
    if name.startswith("linf"):
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max().item() <= 1e-6 if a.numel() else True


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("error", type(exc), str(exc))


# ------------------------------------------------------------ random_init
@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 9),
       norm=st.sampled_from(["linf", "l2"]), per_sample=st.booleans())
def test_random_init_never_requires_grad_and_agrees(seed, b, n, norm, per_sample):
    x_nat = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    eps = torch.full((b,), 0.2).requires_grad_() if per_sample else 0.2
    outs = []
    for backend in READY:
        out = ops.random_init(x_nat, eps, norm, generator=torch.Generator().manual_seed(seed + 1),
                              backend=backend)
        assert not out.requires_grad and out.grad_fn is None, backend
        outs.append(out)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert x_nat.grad is None


# ----------------------------------------------------- beyond float32's range
BIG = [1e300, 3.5e38, F32_MAX, 1e39, 10 ** 400]


@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 9),
       name=st.sampled_from(NAMES), big=st.sampled_from(BIG),
       form=st.sampled_from(["float", "float64 tensor"]), inplace=st.booleans())
def test_huge_eps_is_an_unbounded_ball_on_every_backend(seed, b, n, name, big, form, inplace):
    x_adv, x_nat, grad = _data(b, n, seed)
    if form == "float64 tensor":
        if big == 10 ** 400:
            big = 1e300
        eps = torch.full((b,), float(big), dtype=torch.float64)
    else:
        eps = big
    # With no ball, a step is a move then the box; a projection is the box alone.
    if name == "linf_step":
        expect = (x_adv + 0.05 * torch.sign(grad)).clamp(0, 1)
    elif name == "l2_step":
        expect = ref.l2_step(x_adv, x_nat, grad, 0.05, math.inf)
    else:
        expect = x_adv.clamp(0, 1)
    for backend in READY:
        target = x_adv.clone()
        out = _call(name, target, x_nat, grad, 0.05, eps, backend, inplace=inplace)
        _close(out, expect, name)


@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 9),
       big=st.sampled_from(BIG), sign=st.sampled_from([1, -1]), inplace=st.booleans())
def test_huge_alpha_linf_step_lands_on_the_ball_on_every_backend(seed, b, n, big, sign, inplace):
    """A step of ±3.4e38 (what 1e300 saturates to) lands on the ball's face, and sign(0)
    still moves nothing (no 0·inf = NaN). (An L2 step that large overflows float32's
    norms, and backends sum in different orders there: not part of the contract.)"""
    x_adv, x_nat, grad = _data(b, n, seed)
    moved = x_adv + sign * F32_MAX * torch.sign(grad)
    expect = torch.minimum(torch.maximum(moved, x_nat - 0.1), x_nat + 0.1).clamp(0, 1)
    for backend in READY:
        out = _call("linf_step", x_adv.clone(), x_nat, grad, sign * big, 0.1, backend, inplace=inplace)
        _close(out, expect, "linf_step")


@FEW
@given(seed=st.integers(0, 2**31 - 1), lo=st.sampled_from([-1e300, -1e39, -3.5e38, -math.inf]),
       hi=st.sampled_from([1e300, 1e39, 3.5e38, math.inf]), name=st.sampled_from(NAMES))
def test_bounds_beyond_float32_agree(seed, lo, hi, name):
    x_adv, x_nat, grad = _data(2, 5, seed)
    x_adv = x_adv * 1e38   # values near the edge of float32, some of them past x_nat's ball
    outs = [_call(name, x_adv, x_nat, grad, 1e38, 2e38, be, lower=lo, upper=hi) for be in READY]
    for out in outs[1:]:
        _close(out, outs[0], "linf" if name.startswith("linf") else name)


# ------------------------------------------------------------------ overlap
@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 7),
       shift=st.integers(1, 12), name=st.sampled_from(NAMES), grad_in_buf=st.booleans(),
       nat_first=st.booleans())
def test_overlapping_in_place_inputs_read_before_written(seed, b, n, shift, name, grad_in_buf, nat_first):
    """x_adv and x_nat (and the gradient) as views of one buffer, offset by ``shift``
    elements (not always a whole sample): every backend gives the answer of copies."""
    g = torch.Generator().manual_seed(seed)
    size = b * n
    base = torch.rand(size + 2 * shift, generator=g)
    base_grad = torch.randn(size, generator=g)

    def views(buf):
        a, o = (shift, 0) if nat_first else (0, shift)
        x_adv = buf[a:a + size].view(b, n)
        x_nat = buf[o:o + size].view(b, n)
        grad = buf[2 * shift:2 * shift + size].view(b, n) if grad_in_buf else base_grad.view(b, n)
        return x_adv, x_nat, grad

    x_adv, x_nat, grad = (t.clone() for t in views(base.clone()))
    expect = _call(name, x_adv, x_nat, grad, 0.05, 0.2, "torch")
    expect_ref = getattr(ref, name)(*((x_adv, x_nat, grad, 0.05) if name in STEPS else (x_adv, x_nat)), 0.2)
    _close(expect, expect_ref, name)
    for backend in READY:
        buf = base.clone()
        x_adv, x_nat, grad = views(buf)
        span = (shift, shift + size) if nat_first else (0, size)
        untouched = torch.ones(buf.numel(), dtype=torch.bool)
        untouched[span[0]:span[1]] = False
        ret = _call(name, x_adv, x_nat, grad, 0.05, 0.2, backend, inplace=True)
        assert ret is x_adv
        _close(x_adv.clone(), expect, name)
        assert torch.equal(buf[untouched], base[untouched]), backend   # nothing else written


# ---------------------------------------------------------- inference tensors
@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 9),
       name=st.sampled_from(NAMES))
def test_inference_tensors_same_on_every_backend(seed, b, n, name):
    x_adv, x_nat, grad = _data(b, n, seed)
    with torch.inference_mode():
        inf_adv = x_adv.clone()
    expect = _call(name, x_adv, x_nat, grad, 0.05, 0.2, "torch")
    errors = []
    for backend in READY:
        target = inf_adv
        before = target.clone()
        res = _outcome(lambda: _call(name, target, x_nat, grad, 0.05, 0.2, backend, inplace=True))
        errors.append(res)
        assert res[0] == "error" and res[1] is ValueError and "inference tensor" in res[2], (backend, res)
        assert torch.equal(target, before), backend                    # nothing written
        out = _call(name, inf_adv, x_nat, grad, 0.05, 0.2, backend)    # out of place: allowed
        _close(out, expect, name)
        with torch.inference_mode():
            t = inf_adv.clone()
            _call(name, t, x_nat, grad, 0.05, 0.2, backend, inplace=True)
        _close(t, expect, name)
    assert all(e == errors[0] for e in errors)
