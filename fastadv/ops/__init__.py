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
on) instead of rewriting it behind autograd's back.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _library, reference
from ._registry import BACKEND_NAMES, backends, resolve_name

__all__ = [
    "linf_step", "linf_step_", "l2_step", "l2_step_",
    "linf_project", "linf_project_", "l2_project", "l2_project_",
    "random_init", "backends", "resolve_name", "reference", "BACKEND_NAMES",
]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
    """Validate alpha/eps; return the (tensor [B] float32 or None, float) pair the ops take."""
    if isinstance(v, Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name}: expected a float or a real tensor of shape [B], got dtype {v.dtype}")
        b = x.shape[0]
        if v.dim() == 0:
            v = v.reshape(1).expand(b)
        if v.dim() != 1 or v.shape[0] != b:
            raise ValueError(f"{name}: expected a float or a per-sample tensor of shape [{b}], "
                             f"got shape {tuple(v.shape)}")
        t = v.to(device=x.device, dtype=torch.float32, non_blocking=True).contiguous()
        if check_values and _values_checkable(t):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite values, got a non-finite entry")
            if nonneg and bool((t < 0).any()):
                raise ValueError(f"{name}: expected values >= 0, got a negative entry")
        return t, 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float or a per-sample tensor [B], got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite value, got {f}")
    if nonneg and f < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {f}")
    return None, f


def _bounds(lower, upper) -> Tuple[float, float]:
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
        if math.isnan(float(v)):
            raise ValueError(f"{name}: expected a number, got NaN")
    lo, hi = float(lower), float(upper)
    if lo > hi:
        raise ValueError(f"lower/upper: expected lower <= upper, got lower={lo} > upper={hi}")
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


def _in_place(op, name: str, t: Tensor, *args) -> Tensor:
    """``op(t, *args)`` writing into ``t``, which must not require grad (the ops are not
    differentiable: autograd would never see the change); returns ``t``."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: requires grad, and the ops are not differentiable: an in-place "
                         f"change would be invisible to autograd; pass {name}.detach() (or call "
                         f"under torch.no_grad())")
    with torch.no_grad():
        op(t, *args)
    return t


def _project_args(x, x_nat, eps, lower, upper, backend, check_values):
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected a batch [B, ...], got a 0-d tensor")
    _check_like("x_nat", x_nat, "x", x, same_dtype=True)
    e = _scalar_arg("eps", eps, x, nonneg=True, check_values=check_values)
    lo, hi = _bounds(lower, upper)
    return (e[0], e[1], lo, hi, _backend_arg(backend))


# ------------------------------------------------------------------- the ops
def linf_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
              lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
              _check_values: bool = True) -> Tensor:
    """clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), lower, upper).

    ``sign(0) = 0``; a NaN entry of ``grad`` moves nothing.
    """
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    with torch.no_grad():
        return torch.ops.fastadv.linf_step(x_adv, x_nat, grad, *args)


def linf_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
               lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
               _check_values: bool = True) -> Tensor:
    """In-place ``linf_step`` on ``x_adv``; returns ``x_adv``."""
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    return _in_place(torch.ops.fastadv.linf_step_, "x_adv", x_adv, x_nat, grad, *args)


def l2_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
            lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
            _check_values: bool = True) -> Tensor:
    """Per sample: x' = x_adv + alpha*g/max(||g||, 1e-12); δ = x'-x_nat scaled by
    min(1, eps/||δ||); clamp to [lower, upper]. Non-finite ``grad`` entries count as 0."""
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    with torch.no_grad():
        return torch.ops.fastadv.l2_step(x_adv, x_nat, grad, *args)


def l2_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Scalar, eps: Scalar,
             lower: float = 0.0, upper: float = 1.0, *, backend: Optional[str] = None,
             _check_values: bool = True) -> Tensor:
    """In-place ``l2_step`` on ``x_adv``; returns ``x_adv``."""
    args = _step_args(x_adv, x_nat, grad, alpha, eps, lower, upper, backend, _check_values)
    return _in_place(torch.ops.fastadv.l2_step_, "x_adv", x_adv, x_nat, grad, *args)


def linf_project(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
                 *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """clamp(clamp(x, x_nat-eps, x_nat+eps), lower, upper)."""
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    with torch.no_grad():
        return torch.ops.fastadv.linf_project(x, x_nat, *args)


def linf_project_(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
                  *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """In-place ``linf_project`` on ``x``; returns ``x``."""
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    return _in_place(torch.ops.fastadv.linf_project_, "x", x, x_nat, *args)


def l2_project(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
               *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """x_nat + (x-x_nat)*min(1, eps/||x-x_nat||) per sample, clamped to [lower, upper]."""
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    with torch.no_grad():
        return torch.ops.fastadv.l2_project(x, x_nat, *args)


def l2_project_(x: Tensor, x_nat: Tensor, eps: Scalar, lower: float = 0.0, upper: float = 1.0,
                *, backend: Optional[str] = None, _check_values: bool = True) -> Tensor:
    """In-place ``l2_project`` on ``x``; returns ``x``."""
    args = _project_args(x, x_nat, eps, lower, upper, backend, _check_values)
    return _in_place(torch.ops.fastadv.l2_project_, "x", x, x_nat, *args)


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
    noise = reference.random_noise(x_nat, eps_v, key, generator)
    out = _library.new_out(x_nat)
    out.copy_(x_nat.to(torch.float32) + noise)
    # Clamp to the bounds (and the ball, which it is already in) with the chosen backend.
    if x_nat.numel():
        big = float("inf")
        torch.ops.fastadv.linf_project_(out, out, None, big, lo, hi, be)
    return out
