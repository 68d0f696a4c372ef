"""JSMA (Papernot et al. 2016): the Jacobian saliency map attack, two input features a step.

"The Limitations of Deep Learning in Adversarial Settings" (Papernot, McDaniel, Jha,
Fredrikson, Celik, Swami, EuroS&P 2016). Each step takes the forward derivatives of the
target logit (a) and of the other logits summed (b), picks the pair of features (p, q)
still in the search domain whose sums A = a_p + a_q and B = b_p + b_q have the signs that
move towards the target (A > 0, B < 0 when increasing) and the largest A·|B|, moves both by
``theta`` (clipped to the box) and takes them out of the domain. A point stops when it is
classified as the target, after ⌈features·gamma / 2⌉ steps, or when no pair is left.

Batched over the batch: one forward and backward of a doubled batch gives both derivatives
of every point (torchattacks takes one backward per class, one image at a time); the best
pair is found exactly from the features on the first two Pareto fronts of (a, −b) instead
of all F² pairs (``best_pairs``); points that are done leave the batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._groups import Working, returned_nonfinite
from ._minnorm import clear_success
from .base import Attack, AttackResult

__all__ = ["JSMA", "best_pairs"]

# float32 elements of one [rows, F, T] block of pair scores (a few such temporaries live at once)
_PAIR_BUDGET = 1 << 23


def _pair_scores(a: Tensor, b: Tensor, ok: Tensor) -> Tensor:
    """[N, K, K] scores −(a_p + a_q)(b_p + b_q) of the pairs with a_p + a_q > 0 and
    b_p + b_q < 0 among features where ``ok``, p ≠ q; −inf elsewhere."""
    A = a[:, :, None] + a[:, None, :]
    B = b[:, :, None] + b[:, None, :]
    k = a.shape[1]
    valid = (A > 0) & (B < 0) & ok[:, :, None] & ok[:, None, :]
    valid &= ~torch.eye(k, dtype=torch.bool, device=a.device)
    return torch.where(valid, -(A * B), -math.inf)


def _two_fronts(a: Tensor, b: Tensor, dom: Tensor) -> Tensor:
    """[N, F] bool: the features of the first two Pareto fronts of the points (a_p, −b_p) in
    ``dom`` (larger a and smaller b are better; equal points are ordered by index, so that
    dominance is a strict order)."""
    n, f = a.shape
    key_a = torch.where(dom, a, -math.inf)
    key_b = torch.where(dom, b, math.inf)
    # order by a descending, then b ascending, then index (stable sorts, last key first)
    perm = key_b.sort(dim=1, stable=True).indices
    perm = perm.gather(1, key_a.gather(1, perm).sort(dim=1, descending=True, stable=True).indices)
    bs = key_b.gather(1, perm)
    inf = torch.full((n, 1), math.inf, device=a.device, dtype=bs.dtype)

    def front(v):
        # a point is on the front when its b is below every b ahead of it in the order
        ahead = torch.cat((inf, v[:, :-1].cummin(1).values), 1)
        return v < ahead

    first = front(bs)
    second = front(torch.where(first, math.inf, bs)) & ~first
    member = torch.zeros(n, f, dtype=torch.bool, device=a.device)
    return member.scatter_(1, perm, (first | second) & dom.gather(1, perm))


def best_pairs(a: Tensor, b: Tensor, dom: Tensor) -> Tensor:
    """The saliency-map argmax of every row, exactly as over all F² pairs, from a few features.

    For each row, the pair (p, q), p ≠ q, both in ``dom``, with a_p + a_q > 0 and
    b_p + b_q < 0 of largest −(a_p + a_q)(b_p + b_q); returned as p·F + q (the first in that
    order among equal scores), -1 where no pair is valid.

    A feature q that some r ≠ p dominates (a_r ≥ a_q, b_r ≤ b_q) scores no more with p than
    r does (float addition and multiplication are monotone, so this holds for the computed
    scores too), and a feature off the first two Pareto fronts is dominated by one feature of
    each. So U_p, the best score of p with a feature T of those two fronts, is the best
    score of p with anything; the best pair scores max U, and every pair that does has both
    its features among the p with U_p = max U. The fronts hold a few dozen features, where
    the full map has F² pairs (600k a row on MNIST, 9.4M on 3×32×32)."""
    n, f = a.shape
    out = torch.full((n,), -1, dtype=torch.long, device=a.device)
    if n == 0 or f < 2:
        return out
    fronts = _two_fronts(a, b, dom)
    t = int(fronts.sum(1).max())
    if t == 0:
        return out
    # the front features of each row first (ascending index), padding after them
    tidx = (~fronts).to(torch.uint8).sort(dim=1, stable=True).indices[:, :t]
    tok = fronts.gather(1, tidx)
    feat = torch.arange(f, device=a.device)
    U = torch.empty(n, f, dtype=a.dtype, device=a.device)
    per = max(1, _PAIR_BUDGET // (f * t))
    for i in range(0, n, per):
        s = slice(i, i + per)
        ti = tidx[s]
        A = a[s, :, None] + a[s].gather(1, ti)[:, None, :]
        B = b[s, :, None] + b[s].gather(1, ti)[:, None, :]
        ok = (A > 0) & (B < 0) & tok[s][:, None, :] & dom[s, :, None]
        ok &= feat[None, :, None] != ti[:, None, :]          # p ≠ r
        U[s] = torch.where(ok, -(A * B), -math.inf).amax(2)
    best = U.amax(1, keepdim=True)
    cand = (U >= best) & torch.isfinite(best)
    k = int(cand.sum(1).max())
    if k == 0:
        return out
    cidx = (~cand).to(torch.uint8).sort(dim=1, stable=True).indices[:, :k]   # ascending: ties as in p·F + q
    per = max(1, _PAIR_BUDGET // (k * k))
    for i in range(0, n, per):
        s = slice(i, i + per)
        ci = cidx[s]
        scores = _pair_scores(a[s].gather(1, ci), b[s].gather(1, ci), cand[s].gather(1, ci))
        top, arg = scores.flatten(1).max(1)
        p, q = ci.gather(1, (arg // k)[:, None]).squeeze(1), ci.gather(1, (arg % k)[:, None]).squeeze(1)
        out[s] = torch.where(torch.isfinite(top), p * f + q, out[s])
    return out


class JSMA(Attack):
    """JSMA, torchattacks' arguments and defaults: ``JSMA(model, theta=1.0, gamma=0.1)``:
    ``theta`` is added to each chosen feature (> 0 increases features, < 0 decreases them),
    ``gamma`` the largest fraction of the features that may change.

    Papernot et al., "The Limitations of Deep Learning in Adversarial Settings", EuroS&P 2016.

    The saliency map needs a target class. Untargeted (the default mode), as in torchattacks,
    the target is the next class, (y + 1) mod classes, but a point stops as soon as it is
    misclassified (torchattacks walks on until the target wins: the same path, cut short, so
    every point it fools is fooled here with at most as many features changed). The targeted
    modes of the base class set the target; then a point stops when the target wins.

    Two departures from torchattacks' code, both where it goes wrong: with ``theta < 0`` its
    scores are negative and its argmax picks an invalid pair (the first feature, twice); and
    where no pair satisfies the sign conditions it changes feature 0. Here the score is
    |A|·|B| in both directions, and a point with no valid pair left stops.

    ``success``: misclassified (or the target reached) at x_adv; ``extra["l0"]`` the number
    of features changed, ``extra["target"]`` the class each point was pushed towards.
    Features are elements (each channel of a pixel counts separately), as there."""

    eps_ball = False  # no budget but the L0 cap (gamma) and the box

    def __init__(self, model, theta: float = 1.0, gamma: float = 0.1, **kwargs):
        super().__init__(kwargs.pop("name", "JSMA"), model, **kwargs)
        self.theta = self._real("theta", theta)
        if not math.isfinite(self.theta) or self.theta == 0:
            raise ValueError(f"theta: expected a finite, nonzero change per feature (> 0 increases, "
                             f"< 0 decreases), got {theta!r}")
        self.gamma = self._real("gamma", gamma)
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma: expected the largest fraction of features to change, in (0, 1], "
                             f"got {gamma!r}")

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        return Attack.is_success(z, y, target)

    def _pairs(self, a: Tensor, b: Tensor, dom: Tensor) -> Tensor:
        """[N] flat pair index p·F + q of the best pair per row (the first in that order among
        equal scores, as a full argmax over all F² pairs gives), -1 where none is valid."""
        if self.theta < 0:   # decreasing: A < 0, B > 0 is increasing's A > 0, B < 0 on −a, −b
            a, b = -a, -b
        return best_pairs(a, b, dom)

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        b, dev = x.shape[0], x.device
        n_cls = self.clean_logits.shape[1] if self.clean_logits is not None else None
        if n_cls is None:
            with torch.no_grad():
                n_cls = self.logits(x[:1]).shape[1]
        targeted = target is not None
        push = target if targeted else (y + 1) % n_cls
        stop_lab = target if targeted else y
        shape = x.shape
        feats = x[0].numel() if b else 0
        max_iters = math.ceil(feats * self.gamma / 2)
        # the iterate in NCHW order (the order torchattacks numbers the features in, which
        # decides ties); the model sees it in the attack's layout (_model_layout)
        flat = x.contiguous().reshape(b, feats).clone()
        span = self.upper - self.lower
        if self.theta > 0:
            dom = flat < self.lower + 0.99 * span
        else:
            dom = flat > self.lower + 0.01 * span
        steps = torch.zeros(b, dtype=torch.long, device=dev)
        W = Working(torch.arange(b, device=dev), x=flat, dom=dom, push=push, lab=stop_lab)

        def derivs(z, lab_, sel):
            # rows of the first half: the target logit; of the second: all logits summed
            return torch.where(sel >= 0, z.gather(1, sel.clamp_min(0)[:, None]).squeeze(1), z.sum(1))

        for it in range(max_iters + 1):
            m = len(W)
            if m == 0:
                break
            xa = W.x.view((m,) + shape[1:])
            if it == max_iters:
                with torch.no_grad():
                    z = self.logits(xa).float()
                g = None
            else:
                sel = torch.cat((W.push, torch.full_like(W.push, -1)))
                _, z2, g2 = self.loss_and_grad(torch.cat((xa, xa)), torch.cat((W.lab, W.lab)), sel, derivs)
                z = z2[:m]
                g = g2.contiguous().reshape(2 * m, feats)
            done = clear_success(z, W.lab, targeted) | ~torch.isfinite(z).all(1)
            if g is None or bool(done.all()):
                break
            a, others = g[:m], g[m:] - g[:m]
            if W.compact(~done):
                keep = ~done
                a, others = a[keep], others[keep]
                m = len(W)
            best = self._pairs(a, others, W.dom)
            move = best >= 0
            r = torch.arange(m, device=dev)
            p, q = (best // feats).clamp_min(0), (best % feats).clamp_min(0)
            xn = W.x.clone()
            for j in (p, q):
                xn[r, j] = torch.where(move, (xn[r, j] + self.theta).clamp(self.lower, self.upper), xn[r, j])
                W.dom[r, j] = W.dom[r, j] & ~move
            W.x = xn
            steps.index_add_(0, W.idx, move.long())
            flat.index_copy_(0, W.idx, xn)
            W.compact(move)   # a point with no valid pair left stops where it is
        x_adv = flat.view(shape)
        with torch.no_grad():
            z = self.exact_logits(x_adv, y)
        success = Attack.is_success(z, y, target)
        l0 = (flat != x.contiguous().reshape(b, feats)).sum(1)
        return AttackResult(x_adv, success, -l0.float(), steps, extra={"l0": l0, "target": push, **returned_nonfinite(z)})
