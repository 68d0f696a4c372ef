"""SPSA (Uesato et al. 2018): L∞ attack with gradients estimated from queries, drop-in for
``torchattacks.SPSA`` (advertorch's).

The gradient of the margin loss is estimated from ``nb_sample`` pairs of queries at
x ± delta·v (v a random ±1 vector), up to ``max_batch_size`` samples per forward for all
points at once (fewer where the rows would not fit the engine's budget: the CPU's cache, half
the GPU's free memory), and followed by Adam (torch's update, written out per row so that fooled points can
leave the batch between iterations); each iterate is projected onto the eps-ball and the box
with ``fastadv.ops.linf_project``. Each point draws its own v (torchattacks shares one v
across the batch).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from . import _engine
from ._groups import Working, finite_rows, success_margin
from .base import Attack, AttackResult, int_arg

__all__ = ["SPSA"]

_BETAS = (0.9, 0.999)   # torch.optim.Adam's defaults, as torchattacks uses it
_ADAM_EPS = 1e-8


class SPSA(Attack):
    """SPSA, torchattacks' arguments and defaults: ``eps=0.3`` (L∞), ``delta=0.01`` (the
    query offset), ``lr=0.01`` (Adam's), ``nb_iter=1`` iterations, ``nb_sample=128`` query
    pairs per gradient estimate, ``max_batch_size=64`` of them per forward.

    Minimises the margin z_label − max_other (targeted: max_other − z_target). ``success``:
    misclassified (or the target) at x_adv; points fooled before the last iteration stop
    there. ``steps``: iterations run per point; ``extra["queries"]``: model queries per
    point."""

    uses_gradients = False

    def __init__(self, model, eps: float = 0.3, delta: float = 0.01, lr: float = 0.01, nb_iter: int = 1,
                 nb_sample: int = 128, max_batch_size: int = 64, **kwargs):
        super().__init__(kwargs.pop("name", "SPSA"), model, eps=eps, **kwargs)
        self.norm = "Linf"
        self.delta = self._positive("delta", delta)
        self.lr = self._positive("lr", lr)
        self.nb_iter = int_arg("nb_iter", nb_iter, 0)
        self.nb_sample = int_arg("nb_sample", nb_sample)
        self.max_batch_size = int_arg("max_batch_size", max_batch_size)

    @classmethod
    def _positive(cls, name: str, v) -> float:
        v = cls._real(name, v)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a finite value > 0, got {v}")
        return v

    _margin = staticmethod(success_margin)  # z_label − max_other (max_other − z_target)

    def _gradient(self, x: Tensor, y: Tensor, tgt: Optional[Tensor], gen: torch.Generator) -> Tensor:
        """The SPSA estimate of ∇ margin at each row of x: the mean over ``nb_sample`` draws of
        (L(x + δv) − L(x − δv)) / (2δ v)."""
        m = x.shape[0]
        grad = torch.zeros_like(x)
        # samples per forward: at most max_batch_size, and as many as the engine's budget
        # (CPU: the last-level cache; CUDA: half the free memory) holds for all m points, at
        # least one: the query rows of a large batch of large inputs never all at once
        rows = _engine.auto_max_rows(self, x, y, tgt, self.max_batch_size * m)
        per_pass = max(1, min(self.max_batch_size, rows // max(m, 1)))
        left = self.nb_sample
        while left > 0:
            s = min(left, per_pass)
            left -= s
            v = torch.randint(0, 2, (s,) + tuple(x.shape), generator=gen, device=x.device).to(x.dtype)
            v.mul_(2).sub_(1)
            ys = y.repeat(s)
            ts = None if tgt is None else tgt.repeat(s)
            rows = (s * m,) + tuple(x.shape[1:])
            with torch.no_grad():
                up = self._margin(self.logits((x + self.delta * v).reshape(rows)).float(), ys, ts)
                down = self._margin(self.logits((x - self.delta * v).reshape(rows)).float(), ys, ts)
            df = (up - down).reshape((s, m) + (1,) * (x.dim() - 1))
            grad += (df * v).sum(0) / (2 * self.delta)      # 1/v = v for v = ±1
        return grad / self.nb_sample

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        b = x.shape[0]
        dev = x.device
        z0 = self.clean_logits
        x_adv = x.clone()
        iters = torch.zeros(b, dtype=torch.long, device=dev)
        success = self.is_success(z0, y, target)
        loss = self._margin(z0, y, target)
        zero = torch.zeros_like(x)
        W = Working(torch.arange(b, device=dev), x=x, y=y, tgt=target, dx=zero, m1=zero, m2=zero)
        W.compact(~success)
        b1, b2 = _BETAS
        for t in range(1, self.nb_iter + 1):
            m = len(W)
            if m == 0:
                break
            g = self._gradient(W.x + W.dx, W.y, W.tgt, gen)
            # torch.optim.Adam's step, row by row
            W.m1 = W.m1.lerp(g, 1 - b1)
            W.m2 = W.m2 * b2 + (1 - b2) * g * g
            step = self.lr / (1 - b1 ** t)
            denom = W.m2.sqrt() / math.sqrt(1 - b2 ** t) + _ADAM_EPS
            x_new = ops.linf_project(W.x + W.dx - step * W.m1 / denom, W.x, self.eps, self.lower, self.upper)
            W.dx = x_new - W.x
            iters.index_add_(0, W.idx, torch.ones(m, dtype=torch.long, device=dev))
            with torch.no_grad():
                z = self.exact_logits(x_new, W.y)
            x_adv.index_copy_(0, W.idx, x_new)
            loss.index_copy_(0, W.idx, self._margin(z, W.y, W.tgt).masked_fill(~finite_rows(z), math.inf))
            hit = self.is_success(z, W.y, W.tgt)
            success.index_copy_(0, W.idx, hit)
            W.compact(~hit)
        queries = iters * (2 * self.nb_sample + 1)
        return AttackResult(x_adv, success, -loss.float(), iters, extra={"queries": queries, "norm": "Linf"})
