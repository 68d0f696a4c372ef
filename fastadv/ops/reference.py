"""Pure-PyTorch reference of every fused op: the definition other backends must match.

Every function here takes already-validated arguments (see ``fastadv.ops``):
``alpha``/``eps`` are Python floats or float32 tensors of shape ``[B]`` on the
inputs' device. Arithmetic is float32; results are cast to ``x_adv``'s dtype.
"""
from __future__ import annotations

import math
import struct
from typing import Union

import torch

Scalar = Union[float, torch.Tensor]

# The floor on a gradient's L2 norm before dividing by it (see l2_step).
GRAD_NORM_FLOOR = 1e-12

# float32's largest finite value. A float alpha/eps beyond it saturates there: the
# arithmetic is float32, where 1e300 would be inf (and inf·sign(0) NaN), and torch refuses
# to turn such a Python float into a float32 scalar at all.
F32_MAX = float(torch.finfo(torch.float32).max)


def saturate(v: float) -> float:
    """A finite alpha/eps clipped to [-F32_MAX, F32_MAX]; ±inf passes (random_init
    projects onto the unbounded ball, eps = inf)."""
    f = float(v)
    return f if math.isinf(f) else min(max(f, -F32_MAX), F32_MAX)


def bound(v: float) -> float:
    """A lower/upper bound as float32 rounds it (±inf beyond its range), so that every
    backend clamps to the same value."""
    try:
        f = float(v)
    except OverflowError:  # an int beyond float64's range
        return math.inf if v > 0 else -math.inf
    if -F32_MAX <= f <= F32_MAX or math.isnan(f) or math.isinf(f):
        return f
    try:
        return struct.unpack("f", struct.pack("f", f))[0]   # rounds to F32_MAX or overflows
    except OverflowError:
        return math.copysign(math.inf, f)


def _per_sample(v: Scalar, ndim: int) -> Scalar:
    """Broadcast a per-sample ``[B]`` tensor against a ``[B, ...]`` tensor."""
    if isinstance(v, torch.Tensor):
        return v.to(torch.float32).reshape((-1,) + (1,) * (ndim - 1))
    return saturate(v)


def finite_sign(grad: torch.Tensor) -> torch.Tensor:
    """sign() in float32 with sign(0) = 0 and sign(NaN) = 0 (a NaN moves nothing)."""
    g = grad.to(torch.float32)
    return torch.where(torch.isnan(g), torch.zeros_like(g), torch.sign(g))


def finite_grad(grad: torch.Tensor) -> torch.Tensor:
    """The gradient in float32 with non-finite entries replaced by 0 (they move nothing)."""
    g = grad.to(torch.float32)
    return torch.where(torch.isfinite(g), g, torch.zeros_like(g))


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1) if t.dim() > 1 else t[:, None], ord=2, dim=1)


def _l2_scale(delta: torch.Tensor, eps: Scalar) -> torch.Tensor:
    """Per-sample factor min(1, eps/||delta||), 1 where ||delta|| <= eps (no 0/0)."""
    norm = _per_sample_norm(delta)
    eps_t = eps if isinstance(eps, torch.Tensor) else torch.full_like(norm, saturate(eps))
    eps_t = eps_t.to(torch.float32)
    # Divide only where it matters so that eps = ||delta|| = 0 gives 1, not NaN.
    safe = torch.where(norm > eps_t, norm, torch.ones_like(norm))
    return torch.where(norm > eps_t, eps_t / safe, torch.ones_like(norm))


def linf_project(x: torch.Tensor, x_nat: torch.Tensor, eps: Scalar,
                 lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    xf, xn = x.to(torch.float32), x_nat.to(torch.float32)
    e = _per_sample(eps, x.dim())
    out = torch.minimum(torch.maximum(xf, xn - e), xn + e)
    return out.clamp(bound(lower), bound(upper)).to(x.dtype)


def l2_project(x: torch.Tensor, x_nat: torch.Tensor, eps: Scalar,
               lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    xf, xn = x.to(torch.float32), x_nat.to(torch.float32)
    delta = xf - xn
    scale = _l2_scale(delta, eps).reshape((-1,) + (1,) * (x.dim() - 1))
    return (xn + delta * scale).clamp(bound(lower), bound(upper)).to(x.dtype)


def linf_step(x_adv: torch.Tensor, x_nat: torch.Tensor, grad: torch.Tensor,
              alpha: Scalar, eps: Scalar, lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), lower, upper)."""
    xa = x_adv.to(torch.float32)
    a = _per_sample(alpha, x_adv.dim())
    moved = xa + a * finite_sign(grad)
    return linf_project(moved, x_nat, eps, lower, upper).to(x_adv.dtype)


def l2_step(x_adv: torch.Tensor, x_nat: torch.Tensor, grad: torch.Tensor,
            alpha: Scalar, eps: Scalar, lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """x' = x_adv + alpha*g/max(||g||, 1e-12); project x'-x_nat onto the eps-ball; clamp."""
    xa = x_adv.to(torch.float32)
    g = finite_grad(grad)
    gnorm = _per_sample_norm(g).clamp_min(GRAD_NORM_FLOOR)
    a = _per_sample(alpha, x_adv.dim())
    moved = xa + a * (g / gnorm.reshape((-1,) + (1,) * (g.dim() - 1)))
    return l2_project(moved, x_nat, eps, lower, upper).to(x_adv.dtype)


def random_noise(x_nat: torch.Tensor, eps: Scalar, norm: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A float32 perturbation drawn uniformly from the L∞ or L2 ball of radius eps."""
    shape, dev = x_nat.shape, x_nat.device
    e = _per_sample(eps, x_nat.dim())
    if norm == "linf":
        u = torch.rand(shape, generator=generator, device=dev, dtype=torch.float32)
        return (2.0 * u - 1.0) * e
    # Uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d).
    z = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
    d = max(math.prod(shape[1:]), 1)  # (an empty batch has no z[0])
    znorm = _per_sample_norm(z).clamp_min(GRAD_NORM_FLOOR)
    u = torch.rand(shape[0], generator=generator, device=dev, dtype=torch.float32)
    r = u.pow(1.0 / d).reshape((-1,) + (1,) * (x_nat.dim() - 1))
    return z / znorm.reshape(r.shape) * r * e


def random_init(x_nat: torch.Tensor, eps: Scalar, norm: str, lower: float = 0.0,
                upper: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = random_noise(x_nat, eps, norm, generator)
    return (x_nat.to(torch.float32) + noise).clamp(bound(lower), bound(upper)).to(x_nat.dtype)
