"""Fused attack primitives: the projected sign-step, L2 step, projections and random init.

Public API (see ``../shared/DESIGN.md``, "The ops contract")::

    linf_step(x_adv, x_nat, grad, alpha, eps, lower=0.0, upper=1.0, *, backend=None)
    l2_step(x_adv, x_nat, grad, alpha, eps, lower=0.0, upper=1.0, *, backend=None)
    linf_project(x, x_nat, eps, lower=0.0, upper=1.0, *, backend=None)
    l2_project(x, x_nat, eps, lower=0.0, upper=1.0, *, backend=None)
    random_init(x_nat, eps, norm, lower=0.0, upper=1.0, *, generator=None, backend=None)
    linf_step_, l2_step_, linf_project_, l2_project_   (in place on the first argument)
    backends() -> {"torch": True, "cpp": True | "why not", "cuda": ..., "triton": ...}

``alpha``/``eps`` are Python floats or per-sample tensors ``[B]``. Inputs may be
float32/float16/bfloat16, contiguous, channels_last or strided; outputs keep the
dtype, shape and memory format of ``x_adv``; arithmetic is float32.

The ops are not differentiable (the step's sign has no useful gradient): outputs never
require grad, and the in-place forms refuse a tensor that requires grad (with grad mode
on) instead of rewriting it behind autograd's back, and an inference tensor outside
inference mode, as torch does. An input of an in-place form may overlap the tensor it
writes (``x_nat = buf[1:]``, ``x_adv = buf[:-1]``): the result is that of reading every
input first. Finite ``alpha``/``eps`` beyond float32's range saturate at ±3.4e38, and
bounds round as float32 rounds them; every backend gives the same answer.

An eager call with plain tensors goes straight to its backend (the cpp/cuda backends:
to the compiled kernel, whose own checks stand in for the Python ones), a few
microseconds of host time. Under ``torch.compile``, jit tracing, CUDA graph capture,
functorch transforms or a dispatch/function mode, and for tensor subclasses, calls go
through the registered custom ops ``torch.ops.fastadv.*`` instead: the same results and
the same errors, tested.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _library, _registry, reference
from ._registry import BACKEND_NAMES, backends, resolve_name

__all__ = [
    "linf_step", "linf_step_", "l2_step", "l2_step_",
    "linf_project", "linf_project_", "l2_project", "l2_project_",
    "random_init", "backends", "resolve_name", "reference", "BACKEND_NAMES",
]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NATIVE = ("cpp", "cuda")
Scalar = Union[float, Tensor]


# ---------------------------------------------------------------- validation
def _values_checkable(t: Tensor) -> bool:
    """Checking a tensor's values needs a host sync: skip it where that is illegal."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _check_tensor(name: str, t, dtypes=_X_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected a floating tensor ({names}), got dtype {t.dtype}")


def _check_like(name: str, t: Tensor, ref_name: str, ref: Tensor, same_dtype: bool) -> None:
    _check_tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), "
                         f"got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")


def _scalar_arg(name: str, v, x: Tensor, nonneg: bool, check_values: bool) -> Tuple[Optional[Tensor], float]:
    """Validate alpha/eps; return the (tensor [B] float32 or None, float) pair the ops take.
    Finite values beyond float32's range saturate to ±3.4e38 (the arithmetic is float32)."""
    if isinstance(v, Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name}: expected a float or a real tensor of shape [B], got dtype {v.dtype}")
        b = x.shape[0]
        if v.dim() == 0:
            v = v.reshape(1).expand(b)
        if v.dim() != 1 or v.shape[0] != b:
            raise ValueError(f"{name}: expected a float or a per-sample tensor of shape [{b}], "
                             f"got shape {tuple(v.shape)}")
        if v.is_meta and not x.is_meta:
            raise ValueError(f"{name}: expected values (a tensor on {x.device} or the CPU), got a "
                             f"meta tensor, which has none")
        # Values are checked before the cast: a float64 1e300 is finite, its float32 is not.
        if check_values and _values_checkable(v) and (not x.is_cuda or _values_checkable(x)):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}: expected finite values, got a non-finite entry")
            if nonneg and bool((v < 0).any()):
                raise ValueError(f"{name}: expected values >= 0, got a negative entry")
        t = v.to(device=x.device, dtype=torch.float32, non_blocking=True)
        if v.dtype == torch.float64:
            t = t.clamp(-reference.F32_MAX, reference.F32_MAX)
        return t.contiguous(), 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float or a per-sample tensor [B], got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:  # an int beyond float64's range: finite, so it saturates
        f = reference.F32_MAX if v > 0 else -reference.F32_MAX
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite value, got {f}")
    if nonneg and f < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {f}")
    return None, reference.saturate(f)


def _bounds(lower, upper) -> Tuple[float, float]:
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
        if isinstance(v, float) and math.isnan(v):
            raise ValueError(f"{name}: expected a number, got NaN")
    lo, hi = reference.bound(lower), reference.bound(upper)
    if lo > hi:
        raise ValueError(f"lower/upper: expected lower <= upper, got lower={lower} > upper={upper}")
    return lo, hi


def _backend_arg(backend) -> str:
    if backend is None:
        return ""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected None or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, check_values):
    _check_tensor("x_adv", x_adv)
    if x_adv.dim() == 0:
        raise ValueError("x_adv: expected a batch [B, ...], got a 0-d tensor")
    _check_like("x_nat", x_nat, "x_adv", x_adv, same_dtype=True)
    _check_like("grad", grad, "x_adv", x_adv, same_dtype=False)
    a = _scalar_arg("alpha", alpha, x_adv, nonneg=False, check_values=check_values)
    e = _scalar_arg("eps", eps, x_adv, nonneg=True, check_values=check_values)
    lo, hi = _bounds(lower, upper)
    return (a[0], a[1], e[0], e[1], lo, hi, _backend_arg(backend))


def _project_args(x, x_nat, eps, lower, upper, backend, check_values):
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected a batch [B, ...], got a 0-d tensor")
    _check_like("x_nat", x_nat, "x", x, same_dtype=True)
    e = _scalar_arg("eps", eps, x, nonneg=True, check_values=check_values)
    lo, hi = _bounds(lower, upper)
    return (e[0], e[1], lo, hi, _backend_arg(backend))


def _check_writable(name: str, t: Tensor) -> None:
    """An in-place op may write ``t``: not behind autograd's back (the ops are not
    differentiable), not into an inference tensor outside inference mode (as torch
    refuses), not into elements that share memory."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: requires grad, and the ops are not differentiable: an in-place "
                         f"change would be invisible to autograd; pass {name}.detach() (or call "
                         f"under torch.no_grad())")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name}: is an inference tensor (made under torch.inference_mode()), which "
                         f"cannot be changed in place outside inference mode; pass {name}.clone() "
                         f"or call under torch.inference_mode()")
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(f"{name}: several of its elements are one memory location (an expand()ed "
                         f"view?), so it cannot be written in place; pass {name}.clone()")


# --------------------------------------------------------------- direct path
# The registered custom ops (fastadv._library) are what torch.compile, CUDA graphs,
# tracing, modes and opcheck see. An eager call with plain tensors skips them: their
# dispatch (argument-default filling, autograd and ADInplaceOrView wrappers) cost
# ~50-80 µs a call, more than a small step's kernel. What they do for the caller is done
# here too: no autograd history, and the written tensor's version counter is bumped.

_direct_calls = True   # False: every call takes the custom op (see ``custom_op_path``)


@contextlib.contextmanager
def custom_op_path():
    """Within it every op call goes through the registered custom op, as under tracing: for
    the tests that compare both paths and the host-time benchmark. Not thread-local."""
    global _direct_calls
    before, _direct_calls = _direct_calls, False
    try:
        yield
    finally:
        _direct_calls = before


def _direct(x: Tensor, *others) -> bool:
    """True when nothing can tell a direct call of the backend from the custom op: plain
    tensors (no subclass: FakeTensor, FunctionalTensor, DTensor, Parameter, ...) on a CPU or
    CUDA device; not compiling, tracing (jit), under a functorch transform (vmap, grad,
    functionalize), a dispatch mode or a function mode other than a default device, nor
    capturing a CUDA graph."""
    if type(x) is not Tensor or not _direct_calls:
        return False
    for t in others:
        # a meta tensor would send the kernel call to its shape-only Meta implementation
        if type(t) is not Tensor or t.is_meta:
            return False
    if (_is_compiling() or _tracing_state() is not None or _dispatch_modes()
            or _functorch_level() is not None):
        return False
    if _function_modes() and not _only_device_modes():
        return False
    if x.is_cpu:
        return True
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


# What _direct asks, bound once (it runs on every call).
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack


def _only_device_modes() -> bool:
    """``torch.set_default_device`` / ``with torch.device(...)`` push a function mode that
    only gives factory calls without a device one; every tensor the ops make names its device."""
    from torch.utils._device import DeviceContext
    return all(type(m) is DeviceContext for m in torch.overrides._get_current_function_mode_stack())


def _quick_scalar(v, nonneg: bool, check_values: bool):
    """alpha/eps as the kernel takes them, without a tensor op: ``(tensor or None, float)``,
    or None where ``_scalar_arg`` must run (to convert, check values, or raise)."""
    kind = type(v)
    if kind is float or kind is int:
        # NaN, inf and values beyond float32 (saturated there) take the full check
        if not -reference.F32_MAX <= v <= reference.F32_MAX or (nonneg and v < 0):
            return None
        return None, float(v)
    if kind is Tensor and not check_values and v.dtype == torch.float32 and v.dim() == 1 \
            and not v.is_meta:
        return v, 0.0   # the kernel checks its shape, device and contiguity
    return None


def _quick_bounds(lower, upper):
    """(lower, upper) where ``_bounds`` would return them unchanged, else None."""
    if ((type(lower) is float or type(lower) is int) and (type(upper) is float or type(upper) is int)
            and -reference.F32_MAX <= lower <= upper <= reference.F32_MAX):
        return float(lower), float(upper)
    return None


def _kernel(op: str, backend, device: torch.device):
    """The compiled kernel (``torch.ops.fastadv_ext.*``) ``op`` would run on here, or None:
    another backend, or a backend argument the full path must judge."""
    if backend is not None and backend not in _NATIVE:
        return None
    try:
        be = _registry.resolve_cached(backend, device)
    except Exception:  # the full path raises it, after the argument checks it does first
        return None
    kernels = getattr(be, "kernels", None)
    return kernels[op] if kernels else None


def _native_step(op: str, out: Optional[Tensor], x_adv: Tensor, x_nat: Tensor, grad: Tensor,
                 alpha, eps, lower, upper, backend, check_values) -> Optional[Tensor]:
    """``op`` straight on the compiled kernel, into ``out`` (None: a new tensor like x_adv);
    returns what it wrote, or None, having written nothing, where the full path must run
    (another backend, a layout to copy, an overlap, bad input to report). The kernel's
    checks (shape, dtype, device, strides, overlap) stand in for the Python ones."""
    a = _quick_scalar(alpha, False, check_values)
    e = _quick_scalar(eps, True, check_values)
    b = _quick_bounds(lower, upper)
    if a is None or e is None or b is None:
        return None
    kernel = _kernel(op, backend, x_adv.device)
    if kernel is None:
        return None
    if out is None:
        out = torch.empty_like(x_adv)   # x_adv's strides where it is dense; else the kernel refuses
    try:
        kernel(out, x_adv, x_nat, grad, a[0], a[1], e[0], e[1], b[0], b[1])
    except RuntimeError:
        return None
    return out


def _native_project(op: str, out: Optional[Tensor], x: Tensor, x_nat: Tensor, eps, lower, upper,
                    backend, check_values) -> Optional[Tensor]:
    """As ``_native_step``, for the projections."""
    e = _quick_scalar(eps, True, check_values)
    b = _quick_bounds(lower, upper)
    if e is None or b is None:
        return None
    kernel = _kernel(op, backend, x.device)
    if kernel is None:
        return None
    if out is None:
        out = torch.empty_like(x)
    try:
        kernel(out, x, x_nat, e[0], e[1], b[0], b[1])
    except RuntimeError:
        return None
    return out


def _quick_writable(t: Tensor) -> bool:
    """``_check_writable`` passes (the stride-0 case is left to the kernel's density check)."""
    return not ((t.requires_grad and torch.is_grad_enabled())
                or (t.is_inference() and not torch.is_inference_mode_enabled()))


def _bump(t: Tensor) -> None:
    """What the custom op's ADInplaceOrView step does: autograd then refuses a graph that
    saved ``t`` before this write."""
    torch._C._increment_version((t,))


def _call(op: str, direct: bool, *args):
    """Out of place through the plain function (direct) or the custom op."""
    with torch.no_grad():
        if direct:
            return _library.IMPLS[op](*args)
        return getattr(torch.ops.fastadv, op)(*args)


def _in_place(op: str, direct: bool, name: str, t: Tensor, *args) -> Tensor:
    """``op(t, *args)`` writing into ``t`` (checked by ``_check_writable``); returns ``t``."""
    _check_writable(name, t)
    with torch.no_grad():
        if direct:
            _library.IMPLS[op](t, *args)
            _bump(t)
        else:
            getattr(torch.ops.fastadv, op)(t, *args)
    return t


# ------------------------------------------------------------------- the ops
def linf_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
              lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
              _check_values: bool = True) -> Tensor:
    """clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), lower, upper).

    ``sign(0) = 0``; a NaN entry of ``grad`` moves nothing.
    """
    direct = _direct(x_adv, x_nat, grad)
    if direct:
        out = _native_step("linf_step", None, x_adv, x_nat, grad, alpha, eps, lower, upper, backend,
                           _check_values)
        if out is not None:
            return out
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    return _call("linf_step", direct, x_adv, x_nat, grad, *args)


def linf_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
               lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
               _check_values: bool = True) -> Tensor:
    """In-place ``linf_step`` on ``x_adv``; returns ``x_adv``."""
    direct = _direct(x_adv, x_nat, grad)
    if direct and _quick_writable(x_adv) and _native_step(
            "linf_step", x_adv, x_adv, x_nat, grad, alpha, eps, lower, upper, backend,
            _check_values) is not None:
        _bump(x_adv)
        return x_adv
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    return _in_place("linf_step_", direct, "x_adv", x_adv, x_nat, grad, *args)


def l2_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
            lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
            _check_values: bool = True) -> Tensor:
    """Per sample: x' = x_adv + alpha*g/max(||g||, 1e-12); δ = x'-x_nat scaled by
    min(1, eps/||δ||); clamp to [lower, upper]. Non-finite ``grad`` entries count as 0."""
    direct = _direct(x_adv, x_nat, grad)
    if direct:
        out = _native_step("l2_step", None, x_adv, x_nat, grad, alpha, eps, lower, upper, backend,
                           _check_values)
        if out is not None:
            return out
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    return _call("l2_step", direct, x_adv, x_nat, grad, *args)


def l2_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
             lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
             _check_values: bool = True) -> Tensor:
    """In-place ``l2_step`` on ``x_adv``; returns ``x_adv``."""
    direct = _direct(x_adv, x_nat, grad)
    if direct and _quick_writable(x_adv) and _native_step(
            "l2_step", x_adv, x_adv, x_nat, grad, alpha, eps, lower, upper, backend,
            _check_values) is not None:
        _bump(x_adv)
        return x_adv
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    return _in_place("l2_step_", direct, "x_adv", x_adv, x_nat, grad, *args)


def linf_project(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
                 *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """clamp(clamp(x, x_nat-eps, x_nat+eps), lower, upper)."""
    direct = _direct(x, x_nat)
    if direct:
        out = _native_project("linf_project", None, x, x_nat, eps, lower, upper, backend, _check_values)
        if out is not None:
            return out
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    return _call("linf_project", direct, x, x_nat, *args)


def linf_project_(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
                  *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """In-place ``linf_project`` on ``x``; returns ``x``."""
    direct = _direct(x, x_nat)
    if direct and _quick_writable(x) and _native_project(
            "linf_project", x, x, x_nat, eps, lower, upper, backend, _check_values) is not None:
        _bump(x)
        return x
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    return _in_place("linf_project_", direct, "x", x, x_nat, *args)


def l2_project(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
               *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """x_nat + (x-x_nat)*min(1, eps/||x-x_nat||) per sample, clamped to [lower, upper]."""
    direct = _direct(x, x_nat)
    if direct:
        out = _native_project("l2_project", None, x, x_nat, eps, lower, upper, backend, _check_values)
        if out is not None:
            return out
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    return _call("l2_project", direct, x, x_nat, *args)


def l2_project_(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
                *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """In-place ``l2_project`` on ``x``; returns ``x``."""
    direct = _direct(x, x_nat)
    if direct and _quick_writable(x) and _native_project(
            "l2_project", x, x, x_nat, eps, lower, upper, backend, _check_values) is not None:
        _bump(x)
        return x
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    return _in_place("l2_project_", direct, "x", x, x_nat, *args)


_NORMS = {"linf": "linf", "inf": "linf", "Linf": "linf", "l2": "l2", "L2": "l2", "2": "l2"}


def random_init(x_nat: Tensor, eps: Scalar, norm: str, lower: float = 0.0, upper: float = 1.0,
                *, generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                _check_values: bool = True) -> Tensor:
    """A random start uniform in the L∞ or L2 ball of radius ``eps`` around ``x_nat``,
    clamped to [lower, upper]. The noise comes from ``generator`` (never the global RNG
    when one is given); the final projection runs on ``backend``."""
    _check_tensor("x_nat", x_nat)
    if x_nat.dim() == 0:
        raise ValueError("x_nat: expected a batch [B, ...], got a 0-d tensor")
    key = _NORMS.get(str(norm)) if isinstance(norm, (str, int, float)) else None
    if norm == float("inf"):
        key = "linf"
    if key is None:
        raise ValueError(f"norm: expected 'linf' or 'l2', got {norm!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != x_nat.device.type:
        raise ValueError(f"generator: expected a generator on {x_nat.device.type}, "
                         f"got one on {generator.device}")
    e_t, e_f, lo, hi, be = _project_args(x_nat, x_nat, eps, lower, upper, backend, _check_values)
    eps_v = e_t if e_t is not None else e_f
    direct = _direct(x_nat)
    with torch.no_grad():   # a start, not a function of x_nat: it never requires grad
        noise = reference.random_noise(x_nat, eps_v, key, generator)
        out = _library.new_out(x_nat)
        out.copy_(x_nat.to(torch.float32) + noise)
        # Clamp to the bounds (and the ball, which it is already in) with the chosen backend.
        if x_nat.numel():
            args = (out, out, None, math.inf, lo, hi, be)
            if direct:
                _library.IMPLS["linf_project_"](*args)
            else:
                torch.ops.fastadv.linf_project_(*args)
    return out
