"""The triton backend against ``fastadv.ops.reference``: shapes, dtypes, layouts, scalars, edge values.

On a machine without GPU the kernels run in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), which costs ~1 ms a
program: shapes stay small, and the block-size knobs of the backend are turned
down (``tiny_blocks``) to walk the multi-tile code paths on small tensors.
Large sizes, CUDA graphs and ``torch.compile`` are ``gpu`` cases.

Agreement asked for: L∞ ops bit for bit (the kernels do the reference's float32
operations in the same order and nothing else); L2 ops, whose norms are summed
in another order, within 1e-6 of the value range in float32 and within one unit
in the last place in float16/bfloat16.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastadv import ops
from fastadv.ops import reference as ref

_status = ops.backends()["triton"]
if _status is not True:
    pytest.skip(f"triton backend not available: {_status}", allow_module_level=True)

from fastadv.ops import _triton_backend as tb  # noqa: E402  (needs triton, checked above)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STEPS = {"linf_step": (ops.linf_step, ops.linf_step_, ref.linf_step),
         "l2_step": (ops.l2_step, ops.l2_step_, ref.l2_step)}
PROJECTIONS = {"linf_project": (ops.linf_project, ops.linf_project_, ref.linf_project),
               "l2_project": (ops.l2_project, ops.l2_project_, ref.l2_project)}
OPS = {**STEPS, **PROJECTIONS}


# ------------------------------------------------------------------ helpers
def _data(shape, dtype, grad_dtype=None, seed=0, lower=0.0, upper=1.0, special=True):
    """x_adv near x_nat inside [lower, upper] ([-1, 2] where unbounded); a gradient
    with exact zeros and, if ``special``, NaN and ±inf entries."""
    g = torch.Generator().manual_seed(seed)
    lo = lower if lower > -float("inf") else -1.0
    hi = upper if upper < float("inf") else 2.0
    x_nat = lo + (hi - lo) * torch.rand(shape, generator=g)
    x_adv = (x_nat + 0.05 * (hi - lo) * torch.randn(shape, generator=g)).clamp(lo, hi)
    grad = torch.randn(shape, generator=g)
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    if special:
        flat = grad.view(-1)
        for i, v in zip((0, 5, 9, 11), (float("nan"), float("inf"), -float("inf"), 0.0)):
            if i < flat.numel():
                flat[i] = v
    grad = grad.to(grad_dtype or dtype)
    return tuple(t.to(DEVICE) for t in (x_adv.to(dtype), x_nat.to(dtype), grad))


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider tensor: not dense
        wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
        wide[..., ::2].copy_(t)
        return wide[..., ::2]
    return t.contiguous()


def _ordered(t):
    """fp16/bf16 bit patterns as integers ordered like the values (±0 both 0)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_matches(out, expect, lower=0.0, upper=1.0, exact=False):
    assert out.shape == expect.shape and out.dtype == expect.dtype and out.device == expect.device
    out, expect = out.cpu(), expect.cpu()
    nan_out, nan_exp = torch.isnan(out), torch.isnan(expect)
    assert torch.equal(nan_out, nan_exp), "NaN in different places"
    o = out.masked_fill(nan_out, 0)
    e = expect.masked_fill(nan_exp, 0)
    if exact:
        diff = (o.float() - e.float()).abs().max().item() if o.numel() else 0.0
        assert torch.equal(o, e), f"not bit-identical to the reference (max diff {diff:g})"
    elif out.dtype == torch.float32:
        span = upper - lower if upper - lower < float("inf") else max(1.0, e.abs().max().item())
        err = (o - e).abs().max().item()
        assert err <= 1e-6 * span, f"max abs error {err:g} > 1e-6 x range {span:g}"
    else:
        ulps = (_ordered(o) - _ordered(e)).abs().max().item()
        assert ulps <= 1, f"{ulps} units in the last place from the reference"


def _assert_same_moves(out, expect, x_adv):
    """The sign decisions: every element moved in the reference's direction (or not at all)."""
    move = torch.sign(out.float() - x_adv.float()).nan_to_num(0)
    ref_move = torch.sign(expect.float() - x_adv.float()).nan_to_num(0)
    assert torch.equal(move, ref_move)


def _run(name, args, lower=0.0, upper=1.0):
    """(triton result, reference result) for op ``name``."""
    fn, _, reference = OPS[name]
    out = fn(*args, lower, upper, backend="triton")
    return out, reference(*args, lower, upper)


def _args(name, x_adv, x_nat, grad, alpha, eps):
    return (x_adv, x_nat, grad, alpha, eps) if name in STEPS else (x_adv, x_nat, eps)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 64 elements and at most 4 tiles a sample on the CPU, so that small tensors
    take the many-tile paths (chunk loops, tile tails, several partial sums a sample)."""
    monkeypatch.setattr(tb, "INTERPRET_BLOCK", 64)
    monkeypatch.setattr(tb, "MAX_TILES", 4)


@pytest.fixture(params=["fused", "split"])
def l2_path(request, monkeypatch):
    """L2 ops as one program per sample, or as the three-pass split path (forced)."""
    _use_path(monkeypatch, request.param)
    return request.param


def _use_path(monkeypatch, path):
    if path is not None:
        monkeypatch.setattr(tb, "L2_SCHEDULE", path)


# every op once, L2 ops on both of their paths
OP_PATHS = [pytest.param(name, path, id=f"{name}-{path}" if path else name)
            for name in OPS for path in ((None,) if name.startswith("linf") else ("fused", "split"))]


# ------------------------------------------------------------ dtype coverage
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=lambda d: f"grad_{str(d)[6:]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_linf_step_bit_identical(dtype, grad_dtype):
    x_adv, x_nat, grad = _data((3, 3, 7, 5), dtype, grad_dtype)
    out, expect = _run("linf_step", (x_adv, x_nat, grad, 2 / 255, 8 / 255))
    _assert_matches(out, expect, exact=True)
    _assert_same_moves(out, expect, x_adv)
    # the NaN entry did not step (only the projection moved it), the ±inf ones did
    unstepped = ref.linf_project(x_adv, x_nat, 8 / 255).view(-1)
    assert out.view(-1)[0] == unstepped[0]
    assert out.view(-1)[5] != unstepped[5] or out.view(-1)[9] != unstepped[9]


@pytest.mark.parametrize("grad_dtype", DTYPES, ids=lambda d: f"grad_{str(d)[6:]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_l2_step_matches(dtype, grad_dtype, l2_path, tiny_blocks):
    x_adv, x_nat, grad = _data((3, 3, 7, 5), dtype, grad_dtype, seed=1)
    out, expect = _run("l2_step", (x_adv, x_nat, grad, 0.3, 0.5))
    _assert_matches(out, expect)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,path", [p for p in OP_PATHS if p.values[0] in PROJECTIONS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_projections_match(name, path, dtype, tiny_blocks, monkeypatch):
    _use_path(monkeypatch, path)
    x, x_nat, _ = _data((2, 3, 5, 11), dtype, seed=2)
    x = (x.float() + 0.2 * torch.randn(x.shape, device=DEVICE)).to(dtype)  # far outside the ball
    out, expect = _run(name, (x, x_nat, 0.05 if name == "linf_project" else 0.4))
    _assert_matches(out, expect, exact=name == "linf_project")


# -------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (5, 1, 13, 3), (2, 1000), (7, 1), (1, 1), (2, 3, 17, 19)],
                         ids=str)
@pytest.mark.parametrize("name,path", OP_PATHS)
def test_shapes(name, path, shape, tiny_blocks, monkeypatch):
    _use_path(monkeypatch, path)
    x_adv, x_nat, grad = _data(shape, torch.float32, seed=3)
    out, expect = _run(name, _args(name, x_adv, x_nat, grad, 0.1, 0.2))
    _assert_matches(out, expect, exact=name.startswith("linf"))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float16)],
                         ids=["fp32", "bf16_g32", "fp16"])
def test_imagenet_size(batch, dtype, grad_dtype):
    """3x224x224 with the backend's real block sizes: L2 takes the split path."""
    x_adv, x_nat, grad = _data((batch, 3, 224, 224), dtype, grad_dtype, seed=4)
    for name, alpha, eps in (("linf_step", 1 / 255, 4 / 255), ("l2_step", 0.5, 1.0)):
        out, expect = _run(name, (x_adv, x_nat, grad, alpha, eps))
        _assert_matches(out, expect, exact=name == "linf_step")


# ------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("name", OPS)
def test_layouts(name, layout, tiny_blocks):
    x_adv, x_nat, grad = (_layout(t, layout) for t in _data((2, 3, 9, 11), torch.float32, seed=5))
    out, expect = _run(name, _args(name, x_adv, x_nat, grad, 0.1, 0.3))
    _assert_matches(out, expect, exact=name.startswith("linf"))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_grad_dtype_and_layout_mixed(tiny_blocks):
    """A channels_last bf16 gradient for contiguous fp32 inputs (made to share strides)."""
    x_adv, x_nat, _ = _data((2, 3, 9, 11), torch.float32, seed=6)
    _, _, grad = _data((2, 3, 9, 11), torch.bfloat16, seed=7)
    grad = _layout(grad, "channels_last")
    for name in STEPS:
        out, expect = _run(name, (x_adv, x_nat, grad, 0.1, 0.3))
        _assert_matches(out, expect, exact=name == "linf_step")


# ------------------------------------------------------- per-sample alpha/eps
@pytest.mark.parametrize("name,path", OP_PATHS)
def test_per_sample_alpha_eps(name, path, tiny_blocks, monkeypatch):
    _use_path(monkeypatch, path)
    x_adv, x_nat, grad = _data((5, 2, 9, 7), torch.float32, seed=8)  # 2 tiles a sample
    alpha = torch.tensor([0.1, 0.0, 0.02, -0.05, 0.5], device=DEVICE)
    eps = torch.tensor([0.05, 0.0, 1e30, 0.3, 0.01], device=DEVICE)
    out, expect = _run(name, _args(name, x_adv, x_nat, grad, alpha, eps))
    _assert_matches(out, expect, exact=name.startswith("linf"))
    # eps = 0: sample 1 is exactly x_nat (clamped)
    assert torch.equal(out[1], x_nat[1].clamp(0, 1))


def test_per_sample_low_precision(tiny_blocks):
    x_adv, x_nat, grad = _data((3, 4, 5, 3), torch.float16, torch.bfloat16, seed=9)
    alpha = torch.tensor([0.01, 0.02, 0.03], device=DEVICE)
    eps = torch.tensor([0.03, 0.5, 0.0], device=DEVICE)
    for name in OPS:
        out, expect = _run(name, _args(name, x_adv, x_nat, grad, alpha, eps))
        _assert_matches(out, expect, exact=name.startswith("linf"))


# ------------------------------------------------------------- edge values
@pytest.mark.parametrize("eps,lower,upper", [(0.0, 0.0, 1.0), (1e30, 0.0, 1.0), (0.3, -2.5, 3.0),
                                             (0.3, -float("inf"), float("inf")), (0.2, 0.4, 0.4)],
                         ids=["eps0", "huge_eps", "bounds", "unbounded", "point"])
@pytest.mark.parametrize("name", OPS)
def test_eps_and_bounds(name, eps, lower, upper, tiny_blocks):
    x_adv, x_nat, grad = _data((3, 2, 5, 7), torch.float32, seed=10, lower=lower, upper=upper)
    out, expect = _run(name, _args(name, x_adv, x_nat, grad, 0.25, eps), lower, upper)
    _assert_matches(out, expect, lower, upper, exact=name.startswith("linf"))
    assert bool((out >= lower).all() and (out <= upper).all())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["nan", "zero", "inf", "huge"])
def test_l2_degenerate_gradient(kind, l2_path, tiny_blocks):
    """A sample whose gradient is all NaN / zero / ±inf moves nothing; one so large that
    ‖g‖² overflows float32 moves nothing either, as in the float32 reference."""
    x_adv, x_nat, grad = _data((3, 3, 5, 5), torch.float32, seed=11, special=False)
    grad[1] = {"nan": float("nan"), "zero": 0.0, "inf": float("inf"), "huge": 1e30}[kind]
    out, expect = _run("l2_step", (x_adv, x_nat, grad, 0.2, 10.0))
    _assert_matches(out, expect)
    assert torch.equal(out[1], x_adv[1])
    assert not torch.equal(out[0], x_adv[0])


@pytest.mark.parametrize("name,path", [p for p in OP_PATHS if p.values[0].startswith("l2")])
def test_l2_no_zero_over_zero(name, path, monkeypatch):
    """‖δ‖ = eps = 0 gives the factor 1, not 0/0: x_adv == x_nat with a zero gradient stays put."""
    _use_path(monkeypatch, path)
    x_adv, x_nat, grad = _data((2, 3, 4, 4), torch.float32, seed=16, special=False)
    x_adv = x_nat.clone()
    grad[0] = 0.0
    out, expect = _run(name, _args(name, x_adv, x_nat, grad, 0.1, 0.0))
    _assert_matches(out, expect)
    assert torch.equal(out[0], x_nat[0])


def test_bf16_rounds_ties_to_even():
    """float32 results exactly halfway between two bfloat16 values round to the even one."""
    x_nat = torch.tensor([[1.0, -1.0, 1.0078125, 0.5]], dtype=torch.bfloat16, device=DEVICE)
    x = torch.full_like(x_nat, 2.0) * x_nat.sign()  # far outside: lands on x_nat ± eps
    eps = 2.0 ** -8  # x_nat + eps is a tie for the first three, not for 0.5
    out, expect = _run("linf_project", (x, x_nat, eps), -4.0, 4.0)
    _assert_matches(out, expect, exact=True)
    assert out.float().tolist()[0][:3] == [1.0, -1.0, 1.015625]


def test_linf_nan_inputs_propagate():
    """NaN in x_adv stays NaN (torch.maximum/clamp semantics), never a silent clamp."""
    x_adv, x_nat, grad = _data((2, 17), torch.float32, seed=12)
    x_adv[0, 3] = float("nan")
    out, expect = _run("linf_step", (x_adv, x_nat, grad, 0.1, 0.1))
    _assert_matches(out, expect, exact=True)
    assert torch.isnan(out[0, 3])


# ------------------------------------------------------------------ in place
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("name", OPS)
def test_in_place(name, layout, tiny_blocks):
    _, fn_, reference = OPS[name]
    x_adv, x_nat, grad = (_layout(t, layout) for t in _data((2, 3, 6, 5), torch.bfloat16, seed=13))
    args = _args(name, x_adv, x_nat, grad, 0.05, 0.2)
    expect = reference(*args)
    target = args[0]
    ptr = target.data_ptr()
    returned = fn_(*args, backend="triton")
    assert returned is target and target.data_ptr() == ptr
    _assert_matches(target, expect, exact=name.startswith("linf"))


def test_in_place_via_backend_aliases_out():
    """The backend object itself with ``out`` the same tensor as ``x_adv`` (split L2 path)."""
    x_adv, x_nat, grad = _data((2, 3, 64, 64), torch.float32, seed=14)
    expect = ref.l2_step(x_adv, x_nat, grad, 0.3, 0.2)
    tb.backend.l2_step(x_adv, x_adv, x_nat, grad, 0.3, 0.2, 0.0, 1.0)
    _assert_matches(x_adv, expect)


def test_split_path_deterministic(tiny_blocks, monkeypatch):
    monkeypatch.setattr(tb, "L2_SCHEDULE", "split")
    x_adv, x_nat, grad = _data((3, 3, 11, 7), torch.float32, seed=15)
    first = ops.l2_step(x_adv, x_nat, grad, 0.2, 0.3, backend="triton")
    second = ops.l2_step(x_adv, x_nat, grad, 0.2, 0.3, backend="triton")
    assert torch.equal(first, second)


# ---------------------------------------------------------------- properties
@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), per_sample=st.integers(1, 300), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), alpha=st.floats(0.0, 1.0), eps=st.floats(0.0, 2.0),
       fused=st.booleans())
def test_random_cases(batch, per_sample, seed, dtype, alpha, eps, fused):
    old = tb.L2_SCHEDULE, tb.INTERPRET_BLOCK, tb.MAX_TILES
    tb.L2_SCHEDULE, tb.INTERPRET_BLOCK, tb.MAX_TILES = ("fused" if fused else "split"), 32, 4
    try:
        x_adv, x_nat, grad = _data((batch, per_sample), dtype, seed=seed)
        for name in OPS:
            out, expect = _run(name, _args(name, x_adv, x_nat, grad, alpha, eps))
            _assert_matches(out, expect, exact=name.startswith("linf"))
    finally:
        tb.L2_SCHEDULE, tb.INTERPRET_BLOCK, tb.MAX_TILES = old


# ------------------------------------------------------------------ registry
def test_status_and_supports():
    assert tb.backend.name == "triton"
    assert tb.backend.status() is True
    assert tb.backend.supports(DEVICE) is True
    assert isinstance(tb.backend.supports(torch.device("meta")), str)
    assert ops.resolve_name("triton", DEVICE) == "triton"


def test_status_reason_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setattr(tb, "_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fresh = tb.TritonBackend()
    assert "TRITON_INTERPRET" in fresh.status()
    assert "TRITON_INTERPRET" in fresh.supports(torch.device("cpu"))
    assert fresh.supports(torch.device("cuda")) != True  # noqa: E712  (a reason string)


# Compiles the kernels for sm_90 with Triton's GPU pipeline and ptxas, no GPU needed:
# catches what the interpreter lets through (types merging across branches, dtypes
# it emulates). Runs in a subprocess because this process has the interpreter on.
_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastadv.ops import _triton_backend as tb

def build(fn, x, g, flags, **const):
    types = dict(out_ptr=x, x_ptr=x, nat_ptr=x, grad_ptr=g, alpha_ptr="*fp32", alpha="fp32",
                 eps_ptr="*fp32", eps="fp32", lower="fp32", upper="fp32", numel="i64",
                 per_sample="i32", tiles="i32", pid0="i32", gpart_ptr="*fp32", dpart_ptr="*fp32")
    names = fn.arg_names
    const.update({k: v for k, v in flags.items() if k in names})
    if not const.get("HAS_ALPHA_T", True) and "alpha_ptr" in names:
        const["alpha_ptr"] = None
    sig = {n: "constexpr" if n in const else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if types.get(n, "").startswith("*")
             and n not in const}
    triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8, "enable_fp_fusion": False})

for x, g, flags in (("*fp32", "*fp32", dict(HAS_GRAD=True, HAS_ALPHA_T=False, HAS_EPS_T=False)),
                    ("*bf16", "*fp16", dict(HAS_GRAD=True, HAS_ALPHA_T=True, HAS_EPS_T=True)),
                    ("*fp16", "*bf16", dict(HAS_GRAD=False, HAS_ALPHA_T=False, HAS_EPS_T=True))):
    if not flags["HAS_GRAD"]:
        flags["grad_ptr"] = None
    build(tb._linf_kernel, x, g, flags, BLOCK=4096)
    build(tb._l2_fused_kernel, x, g, flags, BLOCK=2048)
    build(tb._l2_delta_sumsq_kernel, x, g, flags, BLOCK=2048, ITERS=2, TILES_P2=128)
    build(tb._l2_apply_kernel, x, g, flags, BLOCK=2048, ITERS=2, TILES_P2=128)
build(tb._l2_grad_sumsq_kernel, "*fp32", "*bf16", {}, BLOCK=2048, ITERS=3)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu cases compile the kernels for real")
def test_kernels_compile_for_sm90():
    import shutil

    import triton
    nvidia_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not (os.path.exists(nvidia_bin) or shutil.which("ptxas")):
        pytest.skip("no ptxas to compile Triton kernels with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,grad_dtype",
                         [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                          (torch.float16, torch.float32)], ids=["fp32", "bf16", "fp16_g32"])
@pytest.mark.parametrize("shape", [(256, 3, 224, 224), (512, 3, 32, 32), (3, 3, 1023, 517)], ids=str)
def test_gpu_large(shape, dtype, grad_dtype):
    x_adv, x_nat, grad = _data(shape, dtype, grad_dtype, seed=20)
    eps_t = torch.rand(shape[0], device=DEVICE) * 0.1
    for name in OPS:
        for eps in (8 / 255, eps_t):
            out, expect = _run(name, _args(name, x_adv, x_nat, grad, 2 / 255, eps))
            _assert_matches(out, expect, exact=name.startswith("linf"))
    x_cl, n_cl, g_cl = (_layout(t, "channels_last") for t in (x_adv, x_nat, grad))
    out, expect = _run("l2_step", (x_cl, n_cl, g_cl, 0.5, 1.0))
    _assert_matches(out, expect)


@pytest.mark.gpu
@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (8, 3, 224, 224), (40, 3, 224, 224)], ids=str)
def test_gpu_cuda_graph(name, shape):
    """In-place steps captured in a CUDA graph and replayed match eager steps (40x3x224x224:
    the L2 split passes in several waves on an H100/H200, see l2_schedule)."""
    _, fn_, reference = STEPS[name]
    x_adv, x_nat, grad = _data(shape, torch.float32, seed=21, special=False)
    alpha = torch.full((shape[0],), 0.01, device=DEVICE)
    static = x_adv.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compile outside the capture
        fn_(static.clone(), x_nat, grad, alpha, 0.05, backend="triton", _check_values=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn_(static, x_nat, grad, alpha, 0.05, backend="triton", _check_values=False)
    expect = x_adv.clone()
    static.copy_(x_adv)
    for _ in range(3):
        graph.replay()
        expect = reference(expect, x_nat, grad, alpha, 0.05)
    torch.cuda.synchronize()
    _assert_matches(static, expect, exact=name == "linf_step")


@pytest.mark.gpu
def test_gpu_torch_compile():
    x_adv, x_nat, grad = _data((16, 3, 32, 32), torch.float32, seed=22)

    def two_steps(x):
        x = ops.linf_step(x, x_nat, grad, 0.01, 0.03, backend="triton")
        return ops.l2_step(x, x_nat, grad, 0.1, 0.5, backend="triton")

    compiled = torch.compile(two_steps, fullgraph=True)
    _assert_matches(compiled(x_adv), two_steps(x_adv), exact=True)


@pytest.mark.gpu
def test_gpu_in_place_linf_allocates_nothing():
    x_adv, x_nat, grad = _data((128, 3, 32, 32), torch.float32, seed=23)
    ops.linf_step_(x_adv, x_nat, grad, 0.01, 0.03, backend="triton")  # warm up
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    ops.linf_step_(x_adv, x_nat, grad, 0.01, 0.03, backend="triton")
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
