"""Attack-budget sanity: an ε that covers the whole input range is an error unless allowed.

``eps=8`` on inputs in [0, 1] is almost always ``8/255`` mistyped: every input can be
moved onto any other, robust accuracy is 0 by construction, and a report would say so
with every self-check "ok". The CLI calls ``check_eps_budget`` on its flags; an attack can
call it with its own ``eps``, ``norm`` and box (and, for L2/L1, the input size).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

__all__ = ["eps_covers_range", "check_eps_budget"]


def _largest(eps) -> float:
    try:
        import torch
        if isinstance(eps, torch.Tensor):
            return float(eps.max()) if eps.numel() else 0.0
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a number or a tensor, got {type(eps).__name__} {eps!r}")
    return float(eps)


def eps_covers_range(eps, norm: str = "Linf", lower: float = 0.0, upper: float = 1.0,
                     dim: Optional[int] = None) -> bool:
    """True when the ``norm`` ball of radius ``eps`` around any point of the box
    ``[lower, upper]^dim`` contains the whole box: L∞ when eps >= upper − lower, L2 when
    eps >= (upper − lower)·√dim, L1 when eps >= (upper − lower)·dim. For L2/L1 without
    ``dim`` (the input size per sample) nothing can be said: False."""
    e = _largest(eps)
    span = float(upper) - float(lower)
    if not math.isfinite(span) or span <= 0 or not math.isfinite(e):
        return not math.isfinite(e) and e > 0
    if norm == "Linf":
        return e >= span
    if dim is None:
        return False
    if norm == "L2":
        return e >= span * math.sqrt(dim)
    if norm == "L1":
        return e >= span * dim
    raise ValueError(f"norm: expected 'Linf', 'L2' or 'L1', got {norm!r}")


def check_eps_budget(eps, norm: str = "Linf", lower: float = 0.0, upper: float = 1.0,
                     dim: Optional[int] = None, allow_large_eps: bool = False, name: str = "eps",
                     allow_name: str = "allow_large_eps=True") -> None:
    """A ValueError naming ``name`` when ``eps`` covers the whole input range (see
    ``eps_covers_range``) and ``allow_large_eps`` is not set; the message says how to allow it
    (``allow_name``: the keyword or the flag the caller takes)."""
    if allow_large_eps or not eps_covers_range(eps, norm, lower, upper, dim):
        return
    e = _largest(eps)
    hint = ""
    if norm == "Linf" and float(upper) - float(lower) == 1.0 and e >= 1 and e == int(e) and e <= 255:
        hint = f" (did you mean {int(e)}/255?)"
    size = f", {dim} values per input" if norm != "Linf" and dim is not None else ""
    raise ValueError(f"{name}: {e:g} covers the whole input range [{float(lower):g}, {float(upper):g}] "
                     f"({norm}{size}){hint}: every input can be moved onto any other, so robust accuracy is 0 "
                     f"by construction. Budgets are in the input's units: 8/255 is 8 of 255 grey levels "
                     f"on inputs in [0, 1]. Pass {allow_name} if this is meant")
