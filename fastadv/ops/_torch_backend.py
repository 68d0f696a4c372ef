"""The ``torch`` backend: ``fastadv.ops.reference`` through the backend interface.

The ops on float32 tensors take an equivalent route that writes into ``out`` with
in-place ops (the same operations in the same order, so the same bits as the
reference, with one or two temporaries instead of a dozen): this backend is also the
fallback where no compiler is found, and there it must not be slower than the eager
sequence it replaces. Other dtypes take the reference itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _fast_path(out: Tensor, *inputs: Tensor) -> bool:
    """All float32, and ``out`` is not the memory of an input it must still read after
    writing (``x_adv`` itself may be ``out``: each element is read before it is written)."""
    if out.dtype != torch.float32 or any(t.dtype != torch.float32 for t in inputs):
        return False
    return not any(_shares_memory(out, t) for t in inputs[1:])


def _clamp_to_ball_(out: Tensor, x_nat: Tensor, e, lower: float, upper: float) -> None:
    """out = clamp(minimum(maximum(out, x_nat - e), x_nat + e), lower, upper), in place."""
    bound = torch.sub(x_nat, e)
    torch.maximum(out, bound, out=out)
    torch.add(x_nat, e, out=bound)
    torch.minimum(out, bound, out=out)
    out.clamp_(lower, upper)


def _project_delta_(out: Tensor, delta: Tensor, x_nat: Tensor, eps, lower: float, upper: float) -> None:
    """out = clamp(x_nat + delta·min(1, eps/‖delta‖), lower, upper); ``delta`` is consumed."""
    delta.mul_(ref._per_sample(ref._l2_scale(delta, eps), delta.dim()))
    torch.add(x_nat, delta, out=out)
    out.clamp_(lower, upper)


class TorchBackend:
    name = "torch"

    def status(self):
        return True

    def supports(self, device: torch.device):
        return True

    def linf_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper):
        if not _fast_path(out, x_adv, x_nat, grad):
            out.copy_(ref.linf_step(x_adv, x_nat, grad, alpha, eps, lower, upper))
            return
        a = ref._per_sample(alpha, out.dim())
        e = ref._per_sample(eps, out.dim())
        move = torch.sign(grad).nan_to_num_(nan=0.0).mul_(a)   # alpha·sign(g), sign(NaN) = 0
        torch.add(x_adv, move, out=out)
        _clamp_to_ball_(out, x_nat, e, lower, upper)

    def l2_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper):
        if not _fast_path(out, x_adv, x_nat, grad):
            out.copy_(ref.l2_step(x_adv, x_nat, grad, alpha, eps, lower, upper))
            return
        t = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite entries move nothing
        gnorm = ref._per_sample_norm(t).clamp_min_(ref.GRAD_NORM_FLOOR)
        t.div_(ref._per_sample(gnorm, t.dim()))
        t.mul_(ref._per_sample(alpha, t.dim()))                    # alpha·g/‖g‖
        torch.add(x_adv, t, out=out)                               # x' (out may be x_adv)
        torch.sub(out, x_nat, out=t)                               # δ = x' - x_nat
        _project_delta_(out, t, x_nat, eps, lower, upper)

    def linf_project(self, out, x, x_nat, eps, lower, upper):
        if not _fast_path(out, x, x_nat):
            out.copy_(ref.linf_project(x, x_nat, eps, lower, upper))
            return
        if not _shares_memory(out, x):
            out.copy_(x)
        _clamp_to_ball_(out, x_nat, ref._per_sample(eps, out.dim()), lower, upper)

    def l2_project(self, out, x, x_nat, eps, lower, upper):
        if not _fast_path(out, x, x_nat):
            out.copy_(ref.l2_project(x, x_nat, eps, lower, upper))
            return
        _project_delta_(out, torch.sub(x, x_nat), x_nat, eps, lower, upper)


backend = TorchBackend()
