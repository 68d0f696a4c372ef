"""Baselines without gradients: Gaussian noise (``GN``) and the identity (``VANILA``),
drop-in for torchattacks' classes of the same names.

They answer "how robust is the model to no attack at all / to random noise" with the same
call, result and guarantees as every attack: the noise comes from the attack's own
generator (``seed=``), the global RNG is left alone and the model comes back as found.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._groups import returned_nonfinite
from .base import Attack, AttackResult

__all__ = ["GN", "VANILA"]


class _Baseline(Attack):
    uses_gradients = False
    eps_ball = False
    targets_supported = False  # torchattacks' supported_mode ["default"]: the setters refuse

    def __init__(self, name: str, model: nn.Module, *, targeted: bool = False, **options):
        if targeted:
            raise ValueError(f"targeted: {name} is untargeted only (as in torchattacks)")
        super().__init__(name, model, **options)

    def _result(self, x_adv: Tensor, x: Tensor, y: Tensor, target: Optional[Tensor],
                z: Optional[Tensor] = None) -> AttackResult:
        if target is not None:
            raise ValueError(f"target: {self.attack} is untargeted only (as in torchattacks)")
        if z is None:
            with torch.no_grad():
                z = self.exact_logits(x_adv, y)
        return AttackResult(x_adv, self.is_success(z, y, None), self.attack_loss(z, y, None).float(),
                            torch.zeros(x.shape[0], dtype=torch.long, device=x.device),
                            extra=returned_nonfinite(z))


class GN(_Baseline):
    """Gaussian noise, drop-in for ``torchattacks.GN(model, std=0.1)``: ``clamp(x + std·N(0, I),
    lower, upper)``, one draw per call from the attack's generator. ``success``: the model
    misclassifies the noisy point."""

    def __init__(self, model: nn.Module, std: float = 0.1, **options):
        super().__init__("GN", model, **options)
        self.std = self._nonneg("std", std)

    def __repr__(self) -> str:
        return f"GN(std={self.std!r}, mode={self._target_mode})"

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
        x_adv = (x + self.std * noise).clamp_(self.lower, self.upper)
        return self._result(x_adv.contiguous(memory_format=_format(x)), x, y, target)


class VANILA(_Baseline):
    """The identity, drop-in for ``torchattacks.VANILA(model)``: returns x (its clean
    accuracy is the robust accuracy reported)."""

    def __init__(self, model: nn.Module, **options):
        super().__init__("VANILA", model, **options)

    def __repr__(self) -> str:
        return f"VANILA(mode={self._target_mode})"

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        return self._result(x.clone(), x, y, target, self.clean_logits)


def _format(t: Tensor):
    from ._engine import memory_format
    return memory_format(t)
