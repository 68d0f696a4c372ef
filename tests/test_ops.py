"""The ops contract: every ready backend against the PyTorch reference, properties, bad input.

Backends that are not ready here (no compiler, no GPU, no triton) are skipped with
the reason ``fastadv.ops.backends()`` gives; the torch backend always runs.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastadv import ops
from fastadv.ops import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cpu_backends():
    names = []
    for name in ("torch", "cpp", "triton"):
        st_ = ops.backends()[name] if name != "torch" else True
        if st_ is True:
            names.append(pytest.param(name))
        else:
            names.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {st_}")))
    return names


BACKENDS = _cpu_backends()


def _inputs(shape, dtype, seed=0, layout="contiguous", grad_dtype=None, zeros=0.1):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g).to(dtype)
    x_adv = (x_nat.float() + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1).to(dtype)
    grad = torch.randn(shape, generator=g)
    grad[torch.rand(shape, generator=g) < zeros] = 0.0
    grad = grad.to(grad_dtype or dtype)
    if layout == "channels_last":
        x_nat, x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_nat, x_adv, grad))
    elif layout == "strided":
        x_nat, x_adv, grad = (_strided(t) for t in (x_nat, x_adv, grad))
    return x_adv, x_nat, grad


def _strided(t):
    """Same values, non-contiguous storage (every other element of a wider tensor)."""
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _assert_close(out, expect, dtype):
    assert out.dtype == expect.dtype and out.shape == expect.shape
    if dtype == torch.float32:
        # the contract: max abs error <= 1e-6 relative to the value range
        assert (out.float() - expect.float()).abs().max().item() <= 1e-6
    else:
        # low precision: at most one unit in the last place of the dtype
        ulp = torch.finfo(dtype).eps * expect.float().abs().clamp_min(1.0)
        assert bool(((out.float() - expect.float()).abs() <= ulp).all())


SHAPES = [(1, 3, 5, 7), (3, 1, 28, 28), (5, 3, 17, 13), (2, 1000), (4, 3, 32, 32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linf_step_matches_reference(backend, shape, dtype):
    x_adv, x_nat, grad = _inputs(shape, dtype)
    out = ops.linf_step(x_adv, x_nat, grad, 2 / 255, 8 / 255, backend=backend)
    _assert_close(out, ref.linf_step(x_adv, x_nat, grad, 2 / 255, 8 / 255), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_step_matches_reference(backend, shape, dtype):
    x_adv, x_nat, grad = _inputs(shape, dtype)
    out = ops.l2_step(x_adv, x_nat, grad, 0.2, 0.5, backend=backend)
    _assert_close(out, ref.l2_step(x_adv, x_nat, grad, 0.2, 0.5), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_layouts_and_grad_dtypes(backend, layout, grad_dtype):
    x_adv, x_nat, grad = _inputs((3, 3, 9, 11), torch.float32, layout=layout, grad_dtype=grad_dtype)
    for op, r in ((ops.linf_step, ref.linf_step), (ops.l2_step, ref.l2_step)):
        out = op(x_adv, x_nat, grad, 0.03, 0.1, backend=backend)
        _assert_close(out, r(x_adv, x_nat, grad, 0.03, 0.1), torch.float32)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_alpha_eps(backend):
    x_adv, x_nat, grad = _inputs((4, 2, 6, 6), torch.float32)
    alpha = torch.tensor([0.0, 0.01, 0.05, 0.3])
    eps = torch.tensor([0.0, 0.02, 0.04, 1.0])
    for op, r in ((ops.linf_step, ref.linf_step), (ops.l2_step, ref.l2_step)):
        out = op(x_adv, x_nat, grad, alpha, eps, backend=backend)
        _assert_close(out, r(x_adv, x_nat, grad, alpha, eps), torch.float32)
    for op, r in ((ops.linf_project, ref.linf_project), (ops.l2_project, ref.l2_project)):
        _assert_close(op(x_adv, x_nat, eps, backend=backend), r(x_adv, x_nat, eps), torch.float32)
    # eps 0 pins the first sample to x_nat exactly
    out = ops.linf_step(x_adv, x_nat, grad, alpha, eps, backend=backend)
    assert torch.equal(out[0], x_nat[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_zero_gradients_move_nothing(backend):
    x_adv, x_nat, grad = _inputs((2, 3, 4, 4), torch.float32)
    x_adv = x_nat.clone()
    grad[0, 0] = float("nan")
    grad[1] = 0.0
    out = ops.linf_step(x_adv, x_nat, grad, 0.1, 0.2, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0], x_adv[0, 0])
    assert torch.equal(out[1], x_adv[1])
    out2 = ops.l2_step(x_adv, x_nat, grad, 0.1, 0.2, backend=backend)
    assert torch.isfinite(out2).all()
    assert torch.equal(out2[1], x_adv[1])  # zero gradient: no movement, no 0/0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["linf_step", "l2_step"])
def test_inplace_forms_match(backend, name):
    x_adv, x_nat, grad = _inputs((3, 3, 8, 8), torch.float32, layout="channels_last")
    expect = getattr(ops, name)(x_adv, x_nat, grad, 0.05, 0.1, backend=backend)
    target = x_adv.clone()
    ptr = target.data_ptr()
    ret = getattr(ops, name + "_")(target, x_nat, grad, 0.05, 0.1, backend=backend)
    assert ret is target and target.data_ptr() == ptr
    assert torch.equal(target, expect)
    # in place on a non-dense view writes through to the view
    x_s, xn_s, g_s = _inputs((3, 3, 8, 8), torch.float32, layout="strided")
    expect = getattr(ops, name)(x_s, xn_s, g_s, 0.05, 0.1, backend=backend)
    getattr(ops, name + "_")(x_s, xn_s, g_s, 0.05, 0.1, backend=backend)
    assert torch.equal(x_s, expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_inplace_and_bounds(backend):
    x, x_nat, _ = _inputs((3, 3, 8, 8), torch.float32)
    x = x + torch.randn_like(x)
    for name in ("linf_project", "l2_project"):
        out = getattr(ops, name)(x, x_nat, 0.1, -0.5, 0.75, backend=backend)
        _assert_close(out, getattr(ref, name)(x, x_nat, 0.1, -0.5, 0.75), torch.float32)
        y = x.clone()
        getattr(ops, name + "_")(y, x_nat, 0.1, -0.5, 0.75, backend=backend)
        assert torch.equal(y, out)
        assert out.min() >= -0.5 and out.max() <= 0.75


def test_large_image_batch_one():
    x_adv, x_nat, grad = _inputs((1, 3, 224, 224), torch.float32)
    for name in ("linf_step", "l2_step"):
        out = getattr(ops, name)(x_adv, x_nat, grad, 0.01, 0.03)
        _assert_close(out, getattr(ref, name)(x_adv, x_nat, grad, 0.01, 0.03), torch.float32)


def test_empty_batch():
    x = torch.rand(0, 3, 4, 4)
    assert ops.linf_step(x, x, x, 0.1, 0.1).shape == x.shape
    assert ops.l2_project_(x, x, 0.1).shape == x.shape
    for norm in ("linf", "l2"):
        assert ops.random_init(x, 0.1, norm).shape == x.shape
        assert ops.random_init(x, torch.zeros(0), norm).shape == x.shape


def test_ops_are_not_differentiable_and_refuse_in_place_on_autograd_tensors():
    g = torch.Generator().manual_seed(0)
    x_nat = torch.rand(2, 3, 4, 4, generator=g)
    grad = torch.randn(2, 3, 4, 4, generator=g)
    x_adv = x_nat.clone().requires_grad_(True)
    for out in (ops.linf_step(x_adv, x_nat, grad, 0.1, 0.1), ops.l2_step(x_adv, x_nat, grad, 0.1, 0.5),
                ops.linf_project(x_adv, x_nat, 0.1), ops.l2_project(x_adv, x_nat, 0.5)):
        assert not out.requires_grad and out.grad_fn is None
    before = x_adv.detach().clone()
    h = x_adv * 1.0   # a non-leaf in a graph, and the leaf itself
    for t in (x_adv, h):
        with pytest.raises(ValueError, match="requires grad.*not differentiable"):
            ops.linf_step_(t, x_nat, grad, 0.1, 0.1)
        with pytest.raises(ValueError, match="requires grad"):
            ops.l2_project_(t, x_nat, 0.5)
    assert torch.equal(x_adv.detach(), before)
    with torch.no_grad():   # the usual attack-loop form
        ops.linf_step_(x_adv, x_nat, grad, 0.1, 0.1)
    assert not torch.equal(x_adv.detach(), before)
    d = x_adv.detach()   # a detached view: allowed, and it writes through to x_adv's data
    assert ops.linf_step_(d, x_nat, grad, 0.1, 0.1) is d


# ---------------------------------------------------------------- properties
finite_floats = st.floats(-4, 4, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0, 2), alpha=st.floats(0, 1),
       lo=st.floats(-1, 0.4), span=st.floats(0, 2),
       b=st.integers(1, 4), n=st.integers(1, 40))
def test_steps_stay_in_ball_and_bounds(seed, eps, alpha, lo, span, b, n):
    g = torch.Generator().manual_seed(seed)
    hi = lo + span
    x_nat = (lo + span * torch.rand(b, n, generator=g))
    x_adv = x_nat + 0.5 * torch.randn(b, n, generator=g)
    grad = torch.randn(b, n, generator=g)
    out = ops.linf_step(x_adv, x_nat, grad, alpha, eps, lo, hi)
    assert out.min() >= lo and out.max() <= hi
    assert ((out - x_nat).abs() <= eps + 1e-6).all()
    out2 = ops.l2_step(x_adv, x_nat, grad, alpha, eps, lo, hi)
    assert out2.min() >= lo and out2.max() <= hi
    assert ((out2 - x_nat).norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0, 2), b=st.integers(1, 4),
       n=st.integers(1, 40))
def test_projecting_twice_equals_once(seed, eps, b, n):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(b, n, generator=g)
    x = x_nat + torch.randn(b, n, generator=g)
    once = ops.linf_project(x, x_nat, eps)
    assert torch.equal(ops.linf_project(once, x_nat, eps), once)
    once2 = ops.l2_project(x, x_nat, eps)
    # a second L2 projection may only rescale by float rounding
    assert torch.allclose(ops.l2_project(once2, x_nat, eps), once2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_in_ball_and_uses_only_its_generator(norm):
    x = torch.rand(64, 1, 6, 6) * 0.5 + 0.25
    state = torch.get_rng_state()
    a = ops.random_init(x, 0.2, norm, generator=torch.Generator().manual_seed(1))
    b = ops.random_init(x, 0.2, norm, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    d = (a - x).flatten(1)
    if norm == "linf":
        assert d.abs().max() <= 0.2 + 1e-6
        # uniform on [-eps, eps]: mean |d| ~ eps/2
        assert abs(d.abs().mean().item() - 0.1) < 0.01
    else:
        r = d.norm(dim=1)
        assert r.max() <= 0.2 + 1e-6
        # uniform in a 36-dim ball: radius ~ eps * U^(1/36), E = eps * 36/37
        assert abs(r.mean().item() - 0.2 * 36 / 37) < 0.01
    assert a.min() >= 0 and a.max() <= 1


def test_random_init_per_sample_eps_and_dtype():
    x = torch.rand(3, 2, 5, 5).to(torch.bfloat16)
    eps = torch.tensor([0.0, 0.1, 0.3])
    out = ops.random_init(x, eps, "linf", generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0], x[0])
    assert (out[1].float() - x[1].float()).abs().max() <= 0.1 + 1e-2


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="x_nat"):
        ops.linf_step(x, torch.rand(2, 3, 4, 5), x, 0.1, 0.1)
    with pytest.raises(ValueError, match="grad"):
        ops.linf_step(x, x, torch.rand(3, 3, 4, 4), 0.1, 0.1)
    with pytest.raises(ValueError, match="eps"):
        ops.linf_step(x, x, x, 0.1, -0.1)
    with pytest.raises(ValueError, match="eps"):
        ops.l2_step(x, x, x, 0.1, torch.tensor([0.1, -0.2]))
    with pytest.raises(ValueError, match="eps"):
        ops.linf_project(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="lower"):
        ops.linf_step(x, x, x, 0.1, 0.1, lower=1.0, upper=0.0)
    with pytest.raises(TypeError, match="x_adv"):
        ops.linf_step(x.to(torch.int32), x, x, 0.1, 0.1)
    with pytest.raises(TypeError, match="x_nat"):
        ops.linf_step(x, x.to(torch.int64), x, 0.1, 0.1)
    with pytest.raises(TypeError, match="x_nat"):
        ops.linf_step(x, x.half(), x, 0.1, 0.1)
    with pytest.raises(TypeError, match="grad"):
        ops.linf_step(x, x, x.to(torch.uint8), 0.1, 0.1)
    with pytest.raises(TypeError, match="alpha"):
        ops.linf_step(x, x, x, "0.1", 0.1)
    with pytest.raises(ValueError, match="alpha"):
        ops.linf_step(x, x, x, float("nan"), 0.1)
    with pytest.raises(TypeError, match="x_adv"):
        ops.linf_step([1.0], x, x, 0.1, 0.1)
    with pytest.raises(ValueError, match="backend"):
        ops.linf_step(x, x, x, 0.1, 0.1, backend="fortran")
    with pytest.raises(ValueError, match="norm"):
        ops.random_init(x, 0.1, "l3")
    with pytest.raises(ValueError, match="cuda"):
        # the cuda backend can never run on CPU tensors; only reachable when it is ready
        if ops.backends()["cuda"] is True:
            ops.linf_step(x, x, x, 0.1, 0.1, backend="cuda")
        else:
            raise ValueError("cuda backend not ready here")


def test_unavailable_backend_warns_and_falls_back(monkeypatch):
    from fastadv.ops import _registry
    x_adv, x_nat, grad = _inputs((2, 4), torch.float32)
    monkeypatch.setattr(_registry, "status", lambda name: "not built in this test")
    monkeypatch.setattr(_registry, "_warned", set())
    monkeypatch.setattr(_registry, "_resolved", {})   # resolutions are cached
    with pytest.warns(RuntimeWarning, match="not available"):
        out = ops.linf_step(x_adv, x_nat, grad, 0.1, 0.1, backend="cpp")
    assert torch.equal(out, ref.linf_step(x_adv, x_nat, grad, 0.1, 0.1))


def test_env_override_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTADV_BACKEND", "torch")
    assert ops.resolve_name(None, torch.device("cpu")) == "torch"


def test_backends_report():
    b = ops.backends()
    assert set(b) == {"torch", "cpp", "cuda", "triton"}
    assert b["torch"] is True
    for name, v in b.items():
        assert v is True or (isinstance(v, str) and v and "\n" not in v), (name, v)
    if not torch.cuda.is_available():
        assert b["cuda"] is not True


# ---------------------------------------------------------------- custom ops
def _op_args():
    x_adv, x_nat, grad = _inputs((2, 3, 5, 5), torch.float32, layout="channels_last")
    eps_t = torch.tensor([0.1, 0.2])
    return x_adv, x_nat, grad, eps_t


@pytest.mark.parametrize("backend", ["", "torch"])
def test_opcheck_every_op(backend):
    x_adv, x_nat, grad, eps_t = _op_args()
    F = torch.ops.fastadv
    cases = [
        (F.linf_step.default, (x_adv, x_nat, grad, None, 0.05, None, 0.1, 0.0, 1.0, backend)),
        (F.linf_step_.default, (x_adv.clone(), x_nat, grad, None, 0.05, eps_t, 0.0, 0.0, 1.0, backend)),
        (F.l2_step.default, (x_adv, x_nat, grad, eps_t, 0.0, None, 0.3, 0.0, 1.0, backend)),
        (F.l2_step_.default, (x_adv.clone(), x_nat, grad, None, 0.05, None, 0.3, 0.0, 1.0, backend)),
        (F.linf_project.default, (x_adv, x_nat, None, 0.1, 0.0, 1.0, backend)),
        (F.linf_project_.default, (x_adv.clone(), x_nat, eps_t, 0.0, 0.0, 1.0, backend)),
        (F.l2_project.default, (x_adv, x_nat, None, 0.1, 0.0, 1.0, backend)),
        (F.l2_project_.default, (x_adv.clone(), x_nat, eps_t, 0.0, 0.0, 1.0, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_sees_the_op():
    x_adv, x_nat, grad, eps_t = _op_args()

    def step(a, n, g, e):
        return ops.linf_step(a, n, g, 0.05, e, _check_values=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x_adv, x_nat, grad, eps_t), step(x_adv, x_nat, grad, eps_t))


def test_one_channel_layouts_mix_without_copies():
    """A one-channel batch in NHWC and one in NCHW differ only in the stride of the size-1
    channel dim: the ops take such inputs as free views (no per-step copy) and compute the
    same result as with matching layouts."""
    from fastadv.ops._library import as_strided_like
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 1, 6, 7, generator=g)
    nhwc = x.clone().as_strided(x.shape, (42, 1, 7, 1))
    assert torch.equal(nhwc, x) and nhwc.stride() != x.stride()
    v = as_strided_like(x, nhwc)
    assert v.data_ptr() == x.data_ptr() and v.stride() == nhwc.stride() and torch.equal(v, x)
    # a real layout difference (more than one channel) still copies, correctly
    x3 = torch.rand(2, 3, 4, 4, generator=g)
    cl = x3.contiguous(memory_format=torch.channels_last)
    c = as_strided_like(x3, cl)
    assert c.data_ptr() != x3.data_ptr() and c.stride() == cl.stride() and torch.equal(c, x3)
    grad = torch.randn(5, 1, 6, 7, generator=g)
    for backend in ("torch", "cpp"):
        if ops.backends().get(backend) is not True:
            continue
        expect = ops.linf_step(x, x, grad, 0.05, 0.1, backend="torch")
        out = nhwc.clone().as_strided(x.shape, (42, 1, 7, 1))
        ops.linf_step_(out, x, grad, 0.05, 0.1, backend=backend)
        assert torch.equal(out, expect), backend


@pytest.mark.parametrize("per_sample", [False, True])
def test_torch_backend_fast_path_is_the_reference_bit_for_bit(per_sample):
    """The ``torch`` backend's float32 L∞ route (in-place ops into ``out``) gives exactly the
    reference's bits, NaN/inf gradients, NaN in x_nat, per-sample alpha/eps and aliasing
    (in place; x_adv that *is* x_nat) included."""
    from fastadv.ops import reference as R
    g = torch.Generator().manual_seed(11)
    b = 6
    x_nat = torch.rand(b, 3, 5, 5, generator=g)
    x_adv = (x_nat + 0.2 * torch.randn(b, 3, 5, 5, generator=g)).clamp(0, 1)
    grad = torch.randn(b, 3, 5, 5, generator=g)
    grad.view(-1)[::7] = float("nan")
    grad.view(-1)[3::11] = float("inf")
    grad.view(-1)[5::13] = 0.0
    x_nat[1, 0, 0, 0] = float("nan")
    alpha = torch.rand(b, generator=g) * 0.1 if per_sample else 0.05
    eps = torch.rand(b, generator=g) * 0.2 if per_sample else 0.1
    expect = R.linf_step(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0)
    got = ops.linf_step(x_adv, x_nat, grad, alpha, eps, backend="torch")
    assert torch.equal(got.nan_to_num(-7.0), expect.nan_to_num(-7.0))
    inplace = x_adv.clone()
    ops.linf_step_(inplace, x_nat, grad, alpha, eps, backend="torch")
    assert torch.equal(inplace.nan_to_num(-7.0), expect.nan_to_num(-7.0))
    proj = ops.linf_project(x_adv, x_nat, eps, backend="torch")
    assert torch.equal(proj.nan_to_num(-7.0), R.linf_project(x_adv, x_nat, eps).nan_to_num(-7.0))
    same = x_nat.clone()                                  # x_adv and x_nat one tensor
    ops.linf_step_(same, same, grad, alpha, eps, backend="torch")
    assert torch.equal(same.nan_to_num(-7.0), R.linf_step(x_nat, x_nat, grad, alpha, eps).nan_to_num(-7.0))
    # the L2 ops' float32 route too (eps scaled up: the L2 ball must bind on some rows)
    e2 = eps * 4 if per_sample else 0.4
    for layout in (torch.contiguous_format, torch.channels_last):
        xa, xn, gr = (t.contiguous(memory_format=layout) for t in (x_adv, x_nat, grad))
        want = R.l2_step(xa, xn, gr, alpha, e2, 0.0, 1.0)
        assert torch.equal(ops.l2_step(xa, xn, gr, alpha, e2, backend="torch").nan_to_num(-7.0),
                           want.nan_to_num(-7.0))
        ip = xa.clone()
        ops.l2_step_(ip, xn, gr, alpha, e2, backend="torch")
        assert torch.equal(ip.nan_to_num(-7.0), want.nan_to_num(-7.0))
        want = R.l2_project(xa, xn, e2)
        assert torch.equal(ops.l2_project(xa, xn, e2, backend="torch").nan_to_num(-7.0), want.nan_to_num(-7.0))
        ip = xa.clone()
        ops.l2_project_(ip, xn, e2, backend="torch")
        assert torch.equal(ip.nan_to_num(-7.0), want.nan_to_num(-7.0))
    # other dtypes take the reference itself
    h = ops.linf_step(x_adv.half(), x_nat.half(), grad, alpha, eps, backend="torch")
    assert torch.equal(h.nan_to_num(-7.0), R.linf_step(x_adv.half(), x_nat.half(), grad, alpha, eps).nan_to_num(-7.0))
