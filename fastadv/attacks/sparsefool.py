"""SparseFool (Modas, Moosavi-Dezfooli, Frossard 2019): few-pixel perturbations from DeepFool's
linearised boundary, drop-in for ``torchattacks.SparseFool``.

Each step runs DeepFool from the current point to a boundary point, pushes it ``lam`` times
further from x, takes the boundary's normal there (∇(z_adv − z_y)) and solves the linear
problem "reach that hyperplane from x moving as few coordinates as possible inside the box"
greedily: coordinates in order of |normal|, each moved as far as the hyperplane needs or the
box allows. Batched: DeepFool runs on every point at once (one [B·K] backward per step, as
in ``DeepFool``), the greedy solve is a sort and a cumulative sum per point instead of a
Python loop per coordinate, and fooled points leave the batch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._groups import Working, returned_nonfinite
from .base import Attack, AttackResult, int_arg
from .deepfool import deepfool_search

__all__ = ["SparseFool"]

_BETA = 1e-3      # the solver's overshoot past the hyperplane (torchattacks' / the paper's)
_MIN_MOVE = 1e-4  # the smallest move of one coordinate


class SparseFool(Attack):
    """SparseFool, torchattacks' arguments and defaults (``steps=10``, ``lam=3``,
    ``overshoot=0.02``); untargeted only. ``deepfool_steps`` (keyword): the inner DeepFool's
    step budget (torchattacks' inner ``DeepFool(model)`` has 50).

    ``success``: misclassified at the end; ``extra["l0"]``: how many input entries changed;
    ``steps``: DeepFool steps plus one normal per SparseFool step, per point."""

    uses_gradients = True
    eps_ball = False
    targets_supported = False   # torchattacks' supported_mode ["default"]
    _success_is_misclassified = True

    def __init__(self, model, steps: int = 10, lam: float = 3, overshoot: float = 0.02, *,
                 deepfool_steps: int = 50, **kwargs):
        super().__init__(kwargs.pop("name", "SparseFool"), model, **kwargs)
        self.steps = int_arg("steps", steps, 0)
        lam = self._real("lam", lam)
        if not (lam > 0 and lam < float("inf")):
            raise ValueError(f"lam: expected a finite value > 0, got {lam}")
        self.lam = lam
        self.overshoot = self._nonneg("overshoot", overshoot)
        self.deepfool_steps = int_arg("deepfool_steps", deepfool_steps)

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        if target is not None:
            raise ValueError("target: SparseFool is untargeted only (as in torchattacks)")
        b = x.shape[0]
        dev = x.device
        z0 = self.clean_logits if self.clean_logits is not None else self.exact_logits(x, y)
        x_adv = x.clone()
        n_steps = torch.zeros(b, dtype=torch.long, device=dev)
        W = Working(torch.arange(b, device=dev), x=x, y=y, cur=x)
        W.compact(z0.argmax(1) == y)
        for _ in range(self.steps):
            m = len(W)
            if m == 0:
                break
            x_df, df_steps, df_cls, _, _ = deepfool_search(self, W.cur, W.y, self.deepfool_steps, 0.02)
            n_steps.index_add_(0, W.idx, df_steps + 1)
            x_b = W.x + self.lam * (x_df - W.x)     # not clamped, as in torchattacks

            def boundary(z, y_, t_):
                # the class the boundary point says, else the one DeepFool went for
                pre = z.argmax(1)
                pre = torch.where(pre == y_, t_, pre)
                return z.gather(1, pre[:, None]).squeeze(1) - z.gather(1, y_[:, None]).squeeze(1)

            _, _, g = self.loss_and_grad(x_b, W.y, df_cls, boundary)
            x_new = self._linear_solver(W.x, g, x_b)
            W.cur = (W.x + (1 + self.overshoot) * (x_new - W.x)).clamp(self.lower, self.upper)
            x_adv.index_copy_(0, W.idx, W.cur)
            with torch.no_grad():
                fooled = self.exact_logits(W.cur, W.y).argmax(1) != W.y
            W.compact(~fooled)
        with torch.no_grad():
            z = self.exact_logits(x_adv, y)
        success = self.is_success(z, y, None)
        l0 = (x_adv != x).flatten(1).sum(1)
        return AttackResult(x_adv, success, self.attack_loss(z, y, None).float(), n_steps,
                            extra={"l0": l0, **returned_nonfinite(z)})

    # ---------------------------------------------------------- the greedy solve
    def _linear_solver(self, x0: Tensor, normal: Tensor, point: Tensor) -> Tensor:
        """x0 moved towards the hyperplane {v : normal·(v − point) = 0} one coordinate at a
        time, largest |normal| first, each as far as the plane needs (plus β) or the box
        allows, until the side changes (torchattacks' ``_linear_solver``, for all rows).

        Where x0 lies on the negative side (the usual case) every coordinate before the
        last one moves to the box, so the moves are cumulative sums; rows on the other side
        or on the plane (where the moves feed back) take the loop."""
        shape = x0.shape
        m = shape[0]
        lo, hi = self.lower, self.upper
        w = normal.reshape(m, -1).float()
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-30)
        x = x0.reshape(m, -1).clone()
        p = point.reshape(m, -1)
        f0 = ((x - p) * w).sum(1)
        aw, order = w.abs().sort(dim=1, descending=True, stable=True)
        s = w.gather(1, order).sign()
        xs = x.gather(1, order)
        room = torch.where(s > 0, hi - xs, xs - lo).clamp_min(0)   # how far the box lets it go
        live = aw > 0
        move = torch.zeros_like(xs)
        neg = f0 < 0
        if bool(neg.any()):
            gain = aw * room                                        # rise of normal·x, moved fully
            before = gain.cumsum(1) - gain                          # the rise before this coordinate
            f = f0[:, None] + before
            need = ((_BETA - f) / aw.clamp_min(1e-30)).clamp_min(_MIN_MOVE)
            last = live & ((need < room) | (f + gain >= 0))
            idx = torch.arange(xs.shape[1], device=x.device)[None, :]
            first = torch.where(last, idx, xs.shape[1]).amin(1, keepdim=True)
            full = live & (idx < first)
            move = torch.where(full, room, torch.where(idx == first, torch.minimum(need, room), 0.0))
            move = torch.where(neg[:, None], move, 0.0)
        rest = (~neg).nonzero().squeeze(1)
        if rest.numel():
            move.index_copy_(0, rest, self._solve_loop(f0[rest], aw[rest], room[rest], live[rest]))
        delta = torch.zeros_like(x).scatter_(1, order, s * move)
        return (x + delta).clamp(lo, hi).reshape(shape)

    @staticmethod
    def _solve_loop(f0: Tensor, aw: Tensor, room: Tensor, live: Tensor) -> Tensor:
        """The coordinate moves (sorted order) for rows that start on the plane's positive
        side or on it: one coordinate per iteration, as torchattacks does, over all such
        rows at once."""
        sign0 = f0.sign()
        beta = _BETA * sign0
        f = f0.clone()
        move = torch.zeros_like(room)
        going = torch.ones_like(f0, dtype=torch.bool)
        for k in range(room.shape[1]):
            going = going & live[:, k]
            if not bool(going.any()):
                break
            need = ((f + beta).abs() / aw[:, k].clamp_min(1e-30)).clamp_min(_MIN_MOVE)
            mk = torch.where(going, torch.minimum(need, room[:, k]), 0.0)
            move[:, k] = mk
            f = f + aw[:, k] * mk
            going = going & (f.sign() == sign0)
        return move
