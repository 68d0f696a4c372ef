"""DeepFool (Moosavi-Dezfooli et al. 2016): the step to the nearest linearised class boundary.

Batched over samples *and* classes: each step builds one [B·K] batch (K candidate
classes per point), so one backward gives every ∇(z_k − z_y); fooled points leave
the batch. No per-sample Python loop.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._groups import Working, finite_rows, lp_norm, norm_name, view_rows
from .base import int_arg
from .base import Attack, AttackResult

__all__ = ["DeepFool", "deepfool_search"]


class DeepFool(Attack):
    """DeepFool, torchattacks' arguments (``steps=50``, ``overshoot=0.02``), L2 (the paper's
    main case) or L∞. ``candidates``: how many top classes (by clean logit, the true one
    included) are considered, as in the paper's implementation (default: all).

    ``success``: misclassified at the end; ``extra["norm_found"]`` the perturbation size.
    ``eps`` (optional, 0 = unbounded): with eps > 0, success also needs the perturbation
    within eps.

    Non-finite logits (NaN or inf) at an iterate decide nothing: the point stops there and
    keeps its last iterate with finite logits (its clean point at worst), never counted
    fooled; ``extra["nonfinite"]`` flags such points and the run warns once."""

    def __init__(self, model, steps: int = 50, overshoot: float = 0.02, *, norm: str = "L2",
                 candidates: Optional[int] = None, eps: float = 0.0, **kwargs):
        super().__init__(kwargs.pop("name", "DeepFool"), model, eps=eps, **kwargs)
        self.steps = int_arg("steps", steps)
        self.overshoot = self._nonneg("overshoot", overshoot)
        self.norm = norm_name(norm)
        if self.norm == "L1":
            raise ValueError("DeepFool: norm 'L1' is not supported (use 'L2' or 'Linf')")
        self.candidates = None if candidates is None else int_arg("candidates", candidates)

    eps_ball = False  # eps (if any) decides success; x_adv is not held to it

    def _budget(self):
        """eps > 0 is a budget (success needs the perturbation within it): checked like a
        ball's (an eps covering the box would make it the unbounded attack)."""
        return (self.norm, self.eps) if self.eps > 0 else None
    targets_supported = False  # as in torchattacks: its target-mode setters refuse

    @property
    def _success_is_misclassified(self) -> bool:
        return self.eps == 0  # with a budget, success also needs the perturbation within it

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        success = Attack.is_success(z, y, None)   # never on non-finite logits
        if self.eps > 0:
            success = success & (lp_norm(x_adv.float() - xf, self.norm) <= self.eps + 1e-6)
        return success

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        if target is not None:
            raise ValueError("DeepFool is untargeted")
        x_adv, steps, _, x_safe, nonfinite = deepfool_search(self, x, y, self.steps, self.overshoot,
                                                             self.norm, self.candidates)
        with torch.no_grad():
            zf = self.logits(x_adv).float()
        # the last step's point was not tried before: non-finite there, the last finite one
        fin = finite_rows(zf)
        nonfinite |= ~fin
        x_adv = torch.where(view_rows(fin, x_adv), x_adv, x_safe)
        success = Attack.is_success(zf, y, None)   # never on non-finite logits
        size = lp_norm(x_adv - x, self.norm)
        if self.eps > 0:
            success = success & (size <= self.eps + 1e-6)
        return AttackResult(x_adv, success, -size, steps,
                            extra={"norm_found": size, "norm": self.norm, "nonfinite": nonfinite})


def deepfool_search(atk: Attack, x: Tensor, y: Tensor, steps: int, overshoot: float, norm: str = "L2",
                    candidates: Optional[int] = None
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """DeepFool's search with ``atk``'s model calls (its normalization, amp, layout):
    ``(x_adv, steps [B], cls [B], x_safe, nonfinite [B])``, ``cls`` the class each point
    ended in when fooled, else the class of the boundary its last step went for (SparseFool's
    target). A point whose logits turn non-finite stops there (the argmax of a NaN row is no
    prediction; its step would be NaN): ``nonfinite`` marks it, and ``x_safe`` holds each
    point's last iterate with finite logits (``x_adv`` is that one for the stopped points)."""
    b = x.shape[0]
    dev = x.device
    with torch.no_grad():
        z0 = atk.logits(x).float()
    n_cls = z0.shape[1]
    k = n_cls if candidates is None else max(2, min(candidates, n_cls))
    # candidate classes: the true class first, then the top others by clean logit
    others = z0.scatter(1, y[:, None], -math.inf).argsort(1, descending=True)[:, : k - 1]
    cand = torch.cat((y[:, None], others), 1)                       # [B, K]
    x_adv = x.clone()
    x_safe = x.clone()
    nonfinite = torch.zeros(b, dtype=torch.bool, device=dev)
    r_tot = torch.zeros_like(x)
    n_steps = torch.zeros(b, dtype=torch.long, device=dev)
    cls = z0.argmax(1)
    W = Working(torch.arange(b, device=dev), x=x, y=y, cand=cand, r=r_tot)
    fooled = cls != y
    if bool(fooled.any()):
        W.compact(~fooled)
    for _ in range(steps):
        m = len(W)
        if m == 0:
            break
        xi = (W.x + (1 + overshoot) * W.r).clamp(atk.lower, atk.upper)
        rows = xi.repeat_interleave(k, 0)
        cl = W.cand.reshape(-1)
        yy = W.y.repeat_interleave(k, 0)

        def diff(zz, y_, c_):
            return zz.gather(1, c_[:, None]).squeeze(1) - zz.gather(1, y_[:, None]).squeeze(1)

        f, z, g = atk.loss_and_grad(rows, yy, cl, diff)
        n_steps.index_add_(0, W.idx, torch.ones(m, dtype=torch.long, device=dev))
        pred = z.reshape(m, k, -1)[:, 0].argmax(1)
        fin = finite_rows(z).reshape(m, k).all(1)
        done = (pred != W.y) & fin
        nonfinite.index_copy_(0, W.idx, nonfinite.index_select(0, W.idx) | ~fin)
        safe = torch.where(view_rows(fin, xi), xi, x_safe.index_select(0, W.idx))
        x_safe.index_copy_(0, W.idx, safe)
        f = f.reshape(m, k)[:, 1:]
        g = g.reshape(m, k, -1)[:, 1:]                               # ∇(z_k − z_y)
        gn = lp_norm(g.reshape(m * (k - 1), -1), "L2" if norm == "L2" else "L1").reshape(m, k - 1)
        dist = f.abs() / (gn + 1e-8)
        l = dist.argmin(1)
        u = torch.arange(m, device=dev)
        cls.index_copy_(0, W.idx, torch.where(done, pred, W.cand[u, l + 1]))
        wl, fl, nl = g[u, l], f[u, l].abs(), gn[u, l]
        if norm == "L2":
            step = ((fl + 1e-4) / (nl ** 2 + 1e-8))[:, None] * wl
        else:
            step = ((fl + 1e-4) / (nl + 1e-8))[:, None] * wl.sign()
        step = step.reshape(W.x.shape)
        # fooled rows keep their perturbation; the others take the step
        r_new = torch.where(view_rows(done, W.r), W.r, W.r + step)
        x_adv.index_copy_(0, W.idx, torch.where(view_rows(done | ~fin, xi), safe, x_adv.index_select(0, W.idx)))
        W.r = r_new
        stop = done | ~fin
        if bool(stop.any()):
            W.compact(~stop)
    if len(W):
        xi = (W.x + (1 + overshoot) * W.r).clamp(atk.lower, atk.upper)
        x_adv.index_copy_(0, W.idx, xi)
    return x_adv, n_steps, cls, x_safe, nonfinite
