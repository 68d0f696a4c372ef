"""The ops' direct eager path against their registered custom ops: same results, same errors.

An eager call with plain tensors skips ``torch.ops.fastadv.*`` (whose dispatch costs tens
of microseconds) and goes straight to the backend; ``fastadv.ops.custom_op_path()`` forces
the custom op, as tracing, compiling, capture and modes do. Every ready CPU backend runs
(triton under ``TRITON_INTERPRET=1``, set by conftest, with small tensors).
"""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastadv import ops
from fastadv.ops import reference as ref

NAMES = ["linf_step", "l2_step", "linf_project", "l2_project"]


def _backends():
    out = []
    for name in ("torch", "cpp", "triton"):
        st = ops.backends()[name]
        out.append(pytest.param(name, marks=() if st is True else pytest.mark.skip(reason=f"{name}: {st}")))
    return out


BACKENDS = _backends()


def _data(shape=(3, 2, 4, 5), seed=0, dtype=torch.float32, grad_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g)
    x_adv = (x_nat + 0.3 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad.view(-1)[::7] = 0.0
    grad.view(-1)[3::11] = float("nan")
    return x_adv.to(dtype), x_nat.to(dtype), grad.to(grad_dtype or dtype)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2].copy_(t)
        return wide[..., ::2]
    return t.contiguous()


def _call(name, inplace, x_adv, x_nat, grad, alpha, eps, backend, **kw):
    fn = getattr(ops, name + ("_" if inplace else ""))
    if name.endswith("step"):
        return fn(x_adv, x_nat, grad, alpha, eps, backend=backend, **kw)
    return fn(x_adv, x_nat, eps, backend=backend, **kw)


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # the comparison is the point: type and message
        return ("error", type(exc), str(exc))


def _both(fn):
    """fn()'s outcome on the direct path and through the custom op."""
    direct = _outcome(fn)
    with ops.custom_op_path():
        custom = _outcome(fn)
    return direct, custom


def _same_tensor(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_both_paths_give_the_same_bits(backend, name):
    """Layouts, dtypes, float / per-sample / 0-d / float64 alpha and eps, in and out of place."""
    b = 3
    scalars = [(0.05, 0.1), (torch.tensor([0.0, 0.02, 0.3]), torch.tensor([0.0, 0.05, 1.0])),
               (torch.tensor(0.04), torch.tensor(0.2, dtype=torch.float64))]
    cases = [("contiguous", torch.float32, None), ("channels_last", torch.float32, torch.bfloat16),
             ("strided", torch.float32, None), ("contiguous", torch.float16, None)]
    if backend == "triton":   # the interpreter costs ~0.1 s a call
        cases, scalars = cases[:2], scalars[:2]
    for layout, dtype, gdt in cases:
        x_adv, x_nat, grad = (_layout(t, layout) for t in _data((b, 2, 4, 5), 1, dtype, gdt))
        for alpha, eps in scalars:
            if name.startswith("l2"):
                eps = eps * 4   # the L2 ball must bind on some rows
            d, c = _both(lambda: _call(name, False, x_adv, x_nat, grad, alpha, eps, backend))
            assert d[0] == c[0] == "ok", (d, c)
            _same_tensor(d[1], c[1])
            assert not d[1].requires_grad
            inplace = []
            for force_custom in (False, True):
                target = _layout(x_adv.clone(), layout)
                ptr = target.data_ptr()
                with ops.custom_op_path() if force_custom else contextlib.nullcontext():
                    ret = _call(name, True, target, x_nat, grad, alpha, eps, backend)
                assert ret is target and target.data_ptr() == ptr
                inplace.append(target)
            _same_tensor(inplace[0], inplace[1])
            assert torch.equal(inplace[0].nan_to_num(-7.0), d[1].nan_to_num(-7.0))


def _odd_inputs():
    """label -> a function making fresh (x_adv, x_nat, grad): valid, off the common layout."""
    def expanded():
        x_adv, x_nat, grad = _data((2, 3, 4, 4), 2)
        return x_adv.contiguous(memory_format=torch.channels_last), x_nat[..., :1].expand(2, 3, 4, 4), grad

    def one_channel_nhwc():
        x_adv, x_nat, grad = _data((2, 1, 4, 4), 3)
        return x_adv.clone().as_strided(x_adv.shape, (16, 1, 4, 1)), x_nat, grad

    def x_adv_is_x_nat():
        x_adv, _, grad = _data((2, 3, 4), 4)
        return x_adv, x_adv, grad

    def grad_is_x_adv():
        x_adv, x_nat, _ = _data((2, 3, 4), 5)
        return x_adv, x_nat, x_adv

    def x_nat_overlaps():
        g = torch.Generator().manual_seed(6)
        buf = torch.rand(3, 3, 4, generator=g)
        return buf[:2], buf[1:], torch.randn(2, 3, 4, generator=g)

    def bf16_grad_in_x_adv():
        x_adv, x_nat, _ = _data((2, 3, 4), 7)
        grad = x_adv.view(-1).view(torch.bfloat16)[:24].view(2, 3, 4)   # x_adv's first 48 bytes
        return x_adv, x_nat, grad

    def empty():
        x_adv, x_nat, grad = _data((2, 3, 4), 8)
        return x_adv[:0], x_nat[:0], grad[:0]

    return {"expanded x_nat": expanded, "one-channel NHWC": one_channel_nhwc,
            "x_adv is x_nat": x_adv_is_x_nat, "grad is x_adv": grad_is_x_adv,
            "x_nat overlaps x_adv": x_nat_overlaps, "bf16 grad in x_adv": bf16_grad_in_x_adv,
            "empty batch": empty}


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_paths_agree_on_odd_inputs(backend):
    """Out of place and in place, each as if every input were read before anything is
    written (the reference on copies), the same bits on both paths."""
    for label, make in _odd_inputs().items():
        for name in NAMES:
            results = []
            for force_custom in (False, True):
                x_adv, x_nat, grad = make()
                copies = (x_adv.clone(), x_nat.clone(), grad.clone())
                with ops.custom_op_path() if force_custom else contextlib.nullcontext():
                    out = _call(name, False, x_adv, x_nat, grad, 0.05, 0.3, backend)
                    ret = _call(name, True, x_adv, x_nat, grad, 0.05, 0.3, backend)
                assert ret is x_adv
                args = copies if name.endswith("step") else copies[:2]
                expect = getattr(ref, name)(*args, *((0.05,) if name.endswith("step") else ()), 0.3)
                tol = 0 if name.startswith("linf") else 1e-6
                for got in (out, x_adv):
                    err = (got.float() - expect.float()).nan_to_num(0).abs().max().item() if got.numel() else 0
                    assert err <= tol, (label, name, force_custom, err)
                results.append((out, x_adv.clone()))
            (o1, t1), (o2, t2) = results
            assert torch.equal(o1.nan_to_num(-7.0), o2.nan_to_num(-7.0)), (label, name)
            assert torch.equal(t1.nan_to_num(-7.0), t2.nan_to_num(-7.0)), (label, name)


def _bad_calls(backend):
    """(label, call) pairs that must fail, each the same way on both paths."""
    x_adv, x_nat, grad = _data((2, 3, 4))
    with torch.inference_mode():
        inf_t = x_adv.clone()
    be = dict(backend=backend)
    return [
        ("x_nat shape", lambda: ops.linf_step_(x_adv.clone(), x_nat[:, :2], grad, 0.1, 0.1, **be)),
        ("grad batch", lambda: ops.l2_step(x_adv, x_nat, grad[:1], 0.1, 0.1, **be)),
        ("x_nat dtype", lambda: ops.linf_step_(x_adv.clone(), x_nat.half(), grad, 0.1, 0.1, **be)),
        ("grad int", lambda: ops.linf_step(x_adv, x_nat, grad.to(torch.int32), 0.1, 0.1, **be)),
        ("x_adv int", lambda: ops.linf_project_(x_adv.to(torch.int64), x_nat, 0.1, **be)),
        ("x_adv 0-d", lambda: ops.linf_step_(torch.tensor(0.5), torch.tensor(0.5), torch.tensor(1.0),
                                             0.1, 0.1, **be)),
        ("x_adv list", lambda: ops.linf_step_([0.5], x_nat, grad, 0.1, 0.1, **be)),
        ("x_nat meta", lambda: ops.linf_step_(x_adv.clone(), x_nat.to("meta"), grad, 0.1, 0.1, **be)),
        ("eps < 0", lambda: ops.linf_step_(x_adv.clone(), x_nat, grad, 0.1, -0.1, **be)),
        ("eps nan", lambda: ops.l2_project_(x_adv.clone(), x_nat, float("nan"), **be)),
        ("eps inf", lambda: ops.linf_project(x_adv, x_nat, float("inf"), **be)),
        ("alpha str", lambda: ops.linf_step_(x_adv.clone(), x_nat, grad, "0.1", 0.1, **be)),
        ("alpha bool", lambda: ops.l2_step_(x_adv.clone(), x_nat, grad, True, 0.1, **be)),
        ("eps [3]", lambda: ops.linf_step_(x_adv.clone(), x_nat, grad, 0.1, torch.ones(3), **be)),
        ("eps [B] < 0", lambda: ops.l2_step_(x_adv.clone(), x_nat, grad, 0.1, torch.tensor([0.1, -1.0]), **be)),
        ("eps [B] nan", lambda: ops.linf_project_(x_adv.clone(), x_nat, torch.tensor([0.1, float("nan")]), **be)),
        ("eps [B] meta", lambda: ops.linf_step_(x_adv.clone(), x_nat, grad, 0.1, torch.ones(2, device="meta"),
                                                _check_values=False, **be)),
        ("lower > upper", lambda: ops.linf_step_(x_adv.clone(), x_nat, grad, 0.1, 0.1, 1.0, 0.0, **be)),
        ("lower nan", lambda: ops.l2_project_(x_adv.clone(), x_nat, 0.1, float("nan"), 1.0, **be)),
        ("upper str", lambda: ops.l2_step_(x_adv.clone(), x_nat, grad, 0.1, 0.1, 0.0, "1", **be)),
        ("requires grad", lambda: ops.linf_step_(x_adv.clone().requires_grad_(), x_nat, grad, 0.1, 0.1, **be)),
        ("inference", lambda: ops.l2_step_(inf_t, x_nat, grad, 0.1, 0.1, **be)),
        ("expanded", lambda: ops.linf_project_(x_adv[:1].expand(2, 3, 4), x_nat, 0.1, **be)),
    ]


@pytest.mark.parametrize("backend", ["torch", "cpp", None, "junk", "cuda"])
def test_both_paths_raise_the_same_errors(backend):
    if backend == "cpp" and ops.backends()["cpp"] is not True:
        pytest.skip(f"cpp: {ops.backends()['cpp']}")
    for label, call in _bad_calls(backend):
        d, c = _both(call)
        assert d[0] == c[0] == "error", (label, d, c)
        assert d == c, label
        assert d[1] in (ValueError, TypeError), (label, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["linf_step_", "l2_step_", "linf_project_", "l2_project_"])
def test_in_place_write_bumps_the_version_on_both_paths(backend, name):
    """A graph that saved x_adv before the step must refuse to backprop, as after any
    in-place op: the direct path bumps the version counter as the custom op does."""
    for force_custom in (False, True):
        x_adv, x_nat, grad = _data((2, 3, 4))
        w = torch.rand(2, 3, 4, requires_grad=True)
        loss = (w * x_adv).sum()            # saves x_adv for backward
        v = x_adv._version
        with ops.custom_op_path() if force_custom else contextlib.nullcontext():
            _call(name[:-1], True, x_adv, x_nat, grad, 0.05, 0.1, backend)
        assert x_adv._version > v
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_direct_gate():
    """What sends a call through the custom op: subclasses, meta tensors, modes, transforms."""
    x = torch.rand(2, 3)
    assert ops._direct(x, x, x)
    assert not ops._direct(torch.nn.Parameter(x), x)
    assert not ops._direct(x, torch.nn.Parameter(x))
    assert not ops._direct(x, x.to("meta"))
    assert not ops._direct(x.to("meta"), x)
    with ops.custom_op_path():
        assert not ops._direct(x, x)
    assert ops._direct(x, x)

    class Noop(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Noop():
        assert not ops._direct(x, x)
    with torch.device("cpu"):   # a default device (torch.set_default_device) changes nothing here
        assert ops._direct(x, x)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not ops._direct(x, x)
    seen = []
    torch.vmap(lambda r: seen.append(ops._direct(r, r)) or r)(x)
    assert seen == [False]


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dispatch_mode_sees_the_custom_op(backend):
    x_adv, x_nat, grad = _data((2, 3, 4))
    expect = ops.linf_step(x_adv, x_nat, grad, 0.05, 0.1, backend=backend)
    target = x_adv.clone()
    with _Record() as rec:
        ops.linf_step_(target, x_nat, grad, 0.05, 0.1, backend=backend)
    assert "fastadv.linf_step_.default" in rec.ops
    assert torch.equal(target.nan_to_num(-7.0), expect.nan_to_num(-7.0))


def test_fake_tensors_and_jit_trace_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x_adv, x_nat, grad = _data((2, 3, 4))
    with FakeTensorMode() as mode:
        fa, fn, fg = (mode.from_tensor(t) for t in (x_adv, x_nat, grad))
        out = ops.l2_step(fa, fn, fg, 0.05, 0.1, _check_values=False)
        assert out.shape == x_adv.shape and type(out) is not torch.Tensor
    traced = torch.jit.trace(lambda a, n, g: ops.linf_step(a, n, g, 0.05, 0.1), (x_adv, x_nat, grad))
    assert "fastadv::linf_step" in str(traced.graph)
    assert torch.equal(traced(x_adv, x_nat, grad).nan_to_num(-7.0),
                       ref.linf_step(x_adv, x_nat, grad, 0.05, 0.1).nan_to_num(-7.0))


def test_host_time_table_runs_and_restores_the_torch_backend():
    """The host-time benchmark's rows (tiny run: no timing claim here) and its no-op
    substitute, which must leave the real torch backend in place afterwards."""
    from fastadv import bench_ops
    from fastadv.ops import _registry
    backends = ["torch", bench_ops.NOOP] + (["cpp"] if ops.backends()["cpp"] is True else [])
    rows = bench_ops.host_table(backends=backends, ops=("linf_step_", "l2_project"), calls=3, repeats=2)
    assert [(r["op"], r["backend"]) for r in rows] == [(o, b) for b in backends
                                                      for o in ("linf_step_", "l2_project")]
    for r in rows:
        assert r["kind"] == "host" and r["direct_us"] > 0 and r["custom_us"] > 0
    assert "custom op" in bench_ops.format_table(rows) and "l2_project" in bench_ops.format_host_table(rows)
    assert type(_registry.resolve("torch", torch.device("cpu"))).__name__ == "TorchBackend"
    x_adv, x_nat, grad = _data((2, 3))
    assert torch.equal(ops.linf_step(x_adv, x_nat, grad, 0.1, 0.2, backend="torch").nan_to_num(-7.0),
                       ref.linf_step(x_adv, x_nat, grad, 0.1, 0.2).nan_to_num(-7.0))
