"""The ``fastadv::`` custom ops (torch.library): layout handling and backend dispatch.

Each op exists out of place (``fastadv::linf_step``) and in place
(``fastadv::linf_step_``, mutating its first argument). Scalars travel as
``(tensor_or_None, float)`` pairs so that a float ``alpha``/``eps`` costs no
allocation. ``backend`` is a backend name or "" for automatic choice, resolved
when the op runs, on the device it runs on.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _registry


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """Storage holds exactly numel elements, each once (any dimension order)."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def batch_outer_dense(t: Tensor) -> bool:
    """True if ``t`` is non-overlapping and dense with dim 0 outermost in memory."""
    if t.dim() == 0 or t.numel() == 0:
        return False
    if not _non_overlapping_and_dense(t):
        return False
    if t.shape[0] == 1:
        return True
    per_sample = t.numel() // t.shape[0]
    return t.stride(0) == per_sample


def new_out(x: Tensor) -> Tensor:
    """An output for ``x``: same dtype and memory format, batch-outermost dense."""
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    if not batch_outer_dense(out):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out


def as_strided_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with ``ref``'s strides: a free view when they differ only on size-1 dims (a
    one-channel batch in NCHW vs NHWC: same addresses element by element), else a copy."""
    if t.stride() == ref.stride() or t.numel() <= 1:
        return t
    if t.shape == ref.shape and all(a == b for n, a, b in zip(t.shape, t.stride(), ref.stride()) if n != 1):
        return t.as_strided(ref.shape, ref.stride(), t.storage_offset())
    return torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _scalar(t: Optional[Tensor], v: float):
    return t if t is not None else v


def _run(op: str, backend: str, out: Tensor, *tensors: Tensor, scalars=(), bounds=()):
    if out.numel() == 0:
        return
    be = _registry.resolve(backend or None, out.device)
    args = [as_strided_like(t, out) for t in tensors]
    getattr(be, op)(out, *args, *scalars, *bounds)


def _span(t: Tensor) -> Tuple[int, int]:
    """The bytes ``[first, end)`` that a non-empty strided tensor can touch."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    first = t.data_ptr()
    return first, first + (last + 1) * t.element_size()


def partial_overlap(target: Tensor, t: Tensor) -> bool:
    """``t`` may share memory with ``target`` other than element for element (the same start,
    dtype and strides): writing ``target`` would then change inputs not yet read.
    Conservative: interleaved views that touch no common element count as overlapping."""
    if t.numel() == 0 or t.untyped_storage().data_ptr() != target.untyped_storage().data_ptr():
        return False   # (memory of another storage is another allocation)
    if (t.data_ptr() == target.data_ptr() and t.dtype == target.dtype
            and all(a == b for n, a, b in zip(t.shape, t.stride(), target.stride()) if n != 1)):
        return False
    a0, a1 = _span(target)
    b0, b1 = _span(t)
    return a0 < b1 and b0 < a1


def _inplace(op: str, backend: str, target: Tensor, *tensors: Tensor, scalars=(), bounds=()):
    if target.numel() == 0:
        return
    # Straight into target when the kernels may: dense, and no input overlapping it in
    # part (x_nat = buf[1:] with x_adv = buf[:-1]); else through a temporary.
    if batch_outer_dense(target) and not any(partial_overlap(target, t) for t in tensors):
        _run(op, backend, target, target, *tensors, scalars=scalars, bounds=bounds)
    else:
        out = new_out(target)
        _run(op, backend, out, target, *tensors, scalars=scalars, bounds=bounds)
        target.copy_(out)


# --------------------------------------------------------------------- steps
# Each op is a plain function (``_linf_step``, ``_linf_step_``, ...) registered as a custom
# op (``linf_step``, ``linf_step_``, ...). fastadv.ops calls the custom op where something
# may be watching (tracing, compiling, capture, a mode, a tensor subclass) and the plain
# function, or the compiled kernel itself, otherwise: the custom op's dispatch costs tens
# of microseconds a call, more than a small step's kernel.
def _linf_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
               eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x_adv)
    _run("linf_step", backend, out, x_adv, x_nat, grad,
         scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))
    return out


def _linf_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
                eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> None:
    _inplace("linf_step", backend, x_adv, x_nat, grad,
             scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))


def _l2_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
             eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x_adv)
    _run("l2_step", backend, out, x_adv, x_nat, grad,
         scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))
    return out


def _l2_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
              eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> None:
    _inplace("l2_step", backend, x_adv, x_nat, grad,
             scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))


def _step_fake(x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper, backend):
    return new_out(x_adv)


def _step_fake_(x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper, backend):
    return None


linf_step = torch.library.custom_op("fastadv::linf_step", _linf_step, mutates_args=())
linf_step_ = torch.library.custom_op("fastadv::linf_step_", _linf_step_, mutates_args=("x_adv",))
l2_step = torch.library.custom_op("fastadv::l2_step", _l2_step, mutates_args=())
l2_step_ = torch.library.custom_op("fastadv::l2_step_", _l2_step_, mutates_args=("x_adv",))
for _op in (linf_step, l2_step):
    _op.register_fake(_step_fake)
for _op in (linf_step_, l2_step_):
    _op.register_fake(_step_fake_)


# --------------------------------------------------------------- projections
def _linf_project(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
                  lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x)
    _run("linf_project", backend, out, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))
    return out


def _linf_project_(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
                   lower: float, upper: float, backend: str) -> None:
    _inplace("linf_project", backend, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))


def _l2_project(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
                lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x)
    _run("l2_project", backend, out, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))
    return out


def _l2_project_(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
                 lower: float, upper: float, backend: str) -> None:
    _inplace("l2_project", backend, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))


def _project_fake(x, x_nat, eps_t, eps, lower, upper, backend):
    return new_out(x)


def _project_fake_(x, x_nat, eps_t, eps, lower, upper, backend):
    return None


linf_project = torch.library.custom_op("fastadv::linf_project", _linf_project, mutates_args=())
linf_project_ = torch.library.custom_op("fastadv::linf_project_", _linf_project_, mutates_args=("x",))
l2_project = torch.library.custom_op("fastadv::l2_project", _l2_project, mutates_args=())
l2_project_ = torch.library.custom_op("fastadv::l2_project_", _l2_project_, mutates_args=("x",))
for _op in (linf_project, l2_project):
    _op.register_fake(_project_fake)
for _op in (linf_project_, l2_project_):
    _op.register_fake(_project_fake_)

# The plain functions by op name, for the direct path.
IMPLS = {"linf_step": _linf_step, "linf_step_": _linf_step_, "l2_step": _l2_step, "l2_step_": _l2_step_,
         "linf_project": _linf_project, "linf_project_": _linf_project_,
         "l2_project": _l2_project, "l2_project_": _l2_project_}
