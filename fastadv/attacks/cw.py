"""Carlini & Wagner L2 (2017): minimum-L2 adversarial examples with a binary search over c.

Minimises ‖x' − x‖₂² + c·max(z_y − max_{j≠y} z_j, −κ) over x' = box(tanh(w)) with
Adam, each point with its own c: after every search step c shrinks for points that
were fooled and grows (×10 until bracketed) for the others. The whole batch runs
together; each point keeps its smallest adversarial perturbation across all steps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._groups import finite_rows, view_rows
from .base import int_arg
from .base import Attack, AttackResult

__all__ = ["CW"]


class CW(Attack):
    """C&W L2, torchattacks' arguments (``c``, ``kappa``, ``steps``, ``lr``) plus
    ``binary_search_steps`` (9, as in the paper's code; 1 gives torchattacks' single run)
    and ``abort_early`` (a search step ends when the loss has stopped falling).

    ``success``: an adversarial example was found (any distance); ``extra["l2"]`` its
    L2 distance (inf if none). Points not fooled come back unchanged. Targeted modes
    of the base class are supported (then z_t must win by κ).

    Non-finite logits (NaN or inf) at an iterate decide nothing: never a success, no loss
    and no gradient for that point at that step (the others' loss, and abort_early, are
    unaffected); ``extra["nonfinite"]`` flags the points that met them and the run warns
    once."""

    def __init__(self, model, c: float = 1, kappa: float = 0, steps: int = 50, lr: float = 0.01, *,
                 binary_search_steps: int = 9, abort_early: bool = True, **kwargs):
        super().__init__(kwargs.pop("name", "CW"), model, **kwargs)
        self.c = self._nonneg("c", c)
        self.kappa = self._nonneg("kappa", kappa)
        self.steps = int_arg("steps", steps)
        self.lr = self._nonneg("lr", lr)
        self.binary_search_steps = int_arg("binary_search_steps", binary_search_steps)
        self.abort_early = self._flag("abort_early", abort_early)

    eps_ball = False  # minimum-norm: no ball, only the box
    # a point not fooled comes back clean, so success is misclassification at x_adv
    _success_is_misclassified = True

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        return Attack.is_success(z, y, target) & torch.isfinite(res.extra["l2"])

    def _to_box(self, w: Tensor) -> Tensor:
        return self.lower + (self.upper - self.lower) * (torch.tanh(w) + 1) * 0.5

    def _from_box(self, x: Tensor) -> Tensor:
        u = ((x - self.lower) / max(self.upper - self.lower, 1e-12) * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)
        return torch.atanh(u)

    def _f(self, z: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        """C&W's f6: how far the point is from being adversarial with confidence κ (≤ 0: done)."""
        lab = y if target is None else target
        z_l = z.gather(1, lab[:, None]).squeeze(1)
        z_o = z.scatter(1, lab[:, None], -math.inf).amax(1)
        m = z_l - z_o if target is None else z_o - z_l
        return m.clamp_min(-self.kappa)

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        b = x.shape[0]
        dev = x.device
        c = torch.full((b,), self.c if self.c > 0 else 1e-3, device=dev)
        lo = torch.zeros(b, device=dev)
        hi = torch.full((b,), math.inf, device=dev)
        # a point adversarial as it is (misclassified, or at its target) is so at distance 0:
        # its clean logits (finite: checked by run) say it, whatever the model does near it
        z0 = self.clean_logits
        if z0 is None:
            with torch.no_grad():
                z0 = self.logits(x).float()
        adv0 = Attack.is_success(z0, y, target)
        if self.kappa > 0:
            adv0 = adv0 & (self._f(z0, y, target) <= -self.kappa + 1e-6)
        best_l2 = torch.where(adv0, 0.0, math.inf)
        best_x = x.clone()
        w0 = self._from_box(x)
        steps_done = torch.zeros(b, dtype=torch.long, device=dev)
        nonfinite = torch.zeros(b, dtype=torch.bool, device=dev)
        for _ in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            fooled_here = torch.zeros(b, dtype=torch.bool, device=dev)
            prev = math.inf
            check = max(self.steps // 10, 1)
            for it in range(self.steps):
                with torch.enable_grad():
                    xa = self._to_box(w)
                    z = self.logits(xa).float()
                    l2sq = (xa - x).pow(2).flatten(1).sum(1)
                    f = self._f(z, y, target)
                    # a row with non-finite logits adds nothing (a NaN would make the sum,
                    # and so abort_early's test, NaN) and gets no gradient
                    fin = finite_rows(z)
                    loss = torch.where(fin, l2sq + c * f, 0.0).sum()
                    opt.zero_grad(set_to_none=True)
                    (g,) = torch.autograd.grad(loss, w)
                nonfinite |= ~fin
                w.grad = torch.where(view_rows(fin, g), g, 0.0)
                with torch.no_grad():
                    adv = Attack.is_success(z, y, target)
                    if self.kappa > 0:
                        adv = adv & (f <= -self.kappa + 1e-6)
                    l2 = l2sq.sqrt()
                    better = adv & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best_x = torch.where(view_rows(better, x), xa.detach(), best_x)
                    fooled_here |= adv
                opt.step()
                steps_done += 1
                if self.abort_early and (it + 1) % check == 0:
                    cur = loss.item()
                    if cur > prev * 0.9999:
                        break
                    prev = cur
            # binary search on c, per point
            hi = torch.where(fooled_here, torch.minimum(hi, c), hi)
            lo = torch.where(fooled_here, lo, torch.maximum(lo, c))
            bracketed = torch.isfinite(hi)
            c = torch.where(bracketed, (lo + hi) / 2, c * 10)
        success = torch.isfinite(best_l2)
        with torch.no_grad():
            z = self.logits(best_x).float()
        loss = -best_l2.clone()
        return AttackResult(best_x, success & Attack.is_success(z, y, target), loss, steps_done,
                            extra={"l2": best_l2, "c": c, "nonfinite": nonfinite})
