"""The fast gradient sign method (Goodfellow et al. 2015), drop-in for ``torchattacks.FGSM``.

One fused L∞ step of size ``eps`` from the clean input: PGD with one step, ``alpha = eps``
and no random start, so it shares PGD's options (loss, targets, amp, layout, backend).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .pgd import _IterativeAttack

__all__ = ["FGSM", "fgsm"]


class FGSM(_IterativeAttack):
    """``FGSM(model, eps=8/255, *, loss="ce", targeted=False, amp=None, channels_last="auto",
    backend=None, normalization=None, lower=0., upper=1., keep=None|"last"|"best", ...)``.

    By default (``keep="last"``) the stepped point, exactly as torchattacks returns it;
    with ``keep="best"`` a sample already misclassified when clean keeps its clean point
    if the step would undo that."""

    norm = "linf"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, **options):
        for k in ("alpha", "steps", "random_start", "restarts"):
            if k in options:
                raise TypeError(f"FGSM: unexpected keyword {k!r} (use PGD for several or "
                                f"random-start steps)")
        super().__init__("FGSM", model, eps, eps, 1, False, **options)

    def __setattr__(self, name, value):
        # FGSM's step size is its radius: keep them together when eps is changed later
        object.__setattr__(self, name, value)
        if name == "eps" and "alpha" in self.__dict__:
            object.__setattr__(self, "alpha", value)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, *,
         target: Optional[Tensor] = None, **options) -> Tensor:
    """``FGSM(model, eps, **options)(x, y, target)``: the adversarial batch."""
    return FGSM(model, eps, **options)(x, y, target)
