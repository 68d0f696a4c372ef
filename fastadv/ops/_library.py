"""The ``fastadv::`` custom ops (torch.library): layout handling and backend dispatch.

Each op exists out of place (``fastadv::linf_step``) and in place
(``fastadv::linf_step_``, mutating its first argument). Scalars travel as
``(tensor_or_None, float)`` pairs so that a float ``alpha``/``eps`` costs no
allocation. ``backend`` is a backend name or "" for automatic choice, resolved
when the op runs, on the device it runs on.
"""
from __future__ import annotations

from typing import Optional

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


def _inplace(op: str, backend: str, target: Tensor, *tensors: Tensor, scalars=(), bounds=()):
    if target.numel() == 0:
        return
    if batch_outer_dense(target):
        _run(op, backend, target, target, *tensors, scalars=scalars, bounds=bounds)
    else:
        out = new_out(target)
        _run(op, backend, out, target, *tensors, scalars=scalars, bounds=bounds)
        target.copy_(out)


# --------------------------------------------------------------------- steps
@torch.library.custom_op("fastadv::linf_step", mutates_args=())
def linf_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
              eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x_adv)
    _run("linf_step", backend, out, x_adv, x_nat, grad,
         scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))
    return out


@linf_step.register_fake
def _(x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper, backend):
    return new_out(x_adv)


@torch.library.custom_op("fastadv::linf_step_", mutates_args=("x_adv",))
def linf_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
               eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> None:
    _inplace("linf_step", backend, x_adv, x_nat, grad,
             scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))


@linf_step_.register_fake
def _(x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper, backend):
    return None


@torch.library.custom_op("fastadv::l2_step", mutates_args=())
def l2_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
            eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x_adv)
    _run("l2_step", backend, out, x_adv, x_nat, grad,
         scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))
    return out


@l2_step.register_fake
def _(x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper, backend):
    return new_out(x_adv)


@torch.library.custom_op("fastadv::l2_step_", mutates_args=("x_adv",))
def l2_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha_t: Optional[Tensor], alpha: float,
             eps_t: Optional[Tensor], eps: float, lower: float, upper: float, backend: str) -> None:
    _inplace("l2_step", backend, x_adv, x_nat, grad,
             scalars=(_scalar(alpha_t, alpha), _scalar(eps_t, eps)), bounds=(lower, upper))


@l2_step_.register_fake
def _(x_adv, x_nat, grad, alpha_t, alpha, eps_t, eps, lower, upper, backend):
    return None


# --------------------------------------------------------------- projections
@torch.library.custom_op("fastadv::linf_project", mutates_args=())
def linf_project(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
                 lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x)
    _run("linf_project", backend, out, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))
    return out


@linf_project.register_fake
def _(x, x_nat, eps_t, eps, lower, upper, backend):
    return new_out(x)


@torch.library.custom_op("fastadv::linf_project_", mutates_args=("x",))
def linf_project_(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
                  lower: float, upper: float, backend: str) -> None:
    _inplace("linf_project", backend, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))


@linf_project_.register_fake
def _(x, x_nat, eps_t, eps, lower, upper, backend):
    return None


@torch.library.custom_op("fastadv::l2_project", mutates_args=())
def l2_project(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
               lower: float, upper: float, backend: str) -> Tensor:
    out = new_out(x)
    _run("l2_project", backend, out, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))
    return out


@l2_project.register_fake
def _(x, x_nat, eps_t, eps, lower, upper, backend):
    return new_out(x)


@torch.library.custom_op("fastadv::l2_project_", mutates_args=("x",))
def l2_project_(x: Tensor, x_nat: Tensor, eps_t: Optional[Tensor], eps: float,
                lower: float, upper: float, backend: str) -> None:
    _inplace("l2_project", backend, x, x_nat, scalars=(_scalar(eps_t, eps),), bounds=(lower, upper))


@l2_project_.register_fake
def _(x, x_nat, eps_t, eps, lower, upper, backend):
    return None
