"""Pixle (Pomponi, Scardapane, Uncini 2022): a black-box attack that rearranges pixels,
drop-in for ``torchattacks.Pixle``.

Each candidate copies the pixels of a random patch of the clean image onto other positions
of the current image (a random position each, or one picked by similarity or distance); the
candidate that lowers the probability of the label most is kept at the end of a restart.
torchattacks runs one image and one candidate at a time; here every point of the batch
draws its own patches and the ``max_iterations`` candidates of a restart (they all start
from the same image, so nothing is lost) are scored in one pass. A point leaves the batch
at its first fooling candidate, which is the one returned, as in torchattacks.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._groups import Working, finite_rows, returned_nonfinite
from .base import Attack, AttackResult, int_arg

__all__ = ["Pixle"]

_MAPPINGS = ("random", "similarity", "similarity_random", "distance", "distance_random")


def _dimensions(name: str, v) -> Tuple[object, object]:
    """A patch side as torchattacks takes it: an int > 0 (pixels) or a float in [0, 1] (a
    fraction of the image side), or a pair of those (the smallest and the largest)."""
    if isinstance(v, (numbers.Real,)) and not isinstance(v, bool):
        v = (v, v)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
        raise ValueError(f"{name}: expected an int > 0, a float in [0, 1] or a pair (min, max) of "
                         f"those, got {v!r}")
    out = []
    for d in v:
        if isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0:
            out.append(int(d))
        elif isinstance(d, float) and 0 <= d <= 1:
            out.append(float(d))
        else:
            raise ValueError(f"{name}: expected ints > 0 or floats in [0, 1], got {d!r} in {v!r}")
    if all(isinstance(d, int) for d in out) and out[0] > out[1]:
        raise ValueError(f"{name}: expected min <= max, got {tuple(out)}")
    return out[0], out[1]


class Pixle(Attack):
    """Pixle, torchattacks' arguments and defaults: patch sides ``x_dimensions=(2, 10)``
    (width) and ``y_dimensions=(2, 10)`` (height), ``pixel_mapping='random'`` (or
    'similarity', 'similarity_random', 'distance', 'distance_random'), ``restarts=20`` of
    ``max_iterations=10`` candidates each; ``update_each_iteration=True`` instead keeps a
    candidate as soon as it lowers the loss, for ``max_iterations`` candidates in all (no
    restarts, as in torchattacks, which allows it for one image only: here any batch).

    x_adv holds only pixels of x: every pixel of it is a pixel of x at some position.
    Minimises the softmax probability of the label (targeted: 1 − that of the target);
    ``steps`` and ``extra["queries"]``: the images scored per point; ``loss``: −(that
    probability) at x_adv.

    Where torchattacks writes a similarity/distance pick to the transposed position (it
    passes (column, row) as (row, column)), the pixel goes where it was picked."""

    uses_gradients = False
    eps_ball = False

    def __init__(self, model, x_dimensions=(2, 10), y_dimensions=(2, 10), pixel_mapping: str = "random",
                 restarts: int = 20, max_iterations: int = 10, update_each_iteration: bool = False, **kwargs):
        super().__init__(kwargs.pop("name", "Pixle"), model, **kwargs)
        self.x_dimensions = _dimensions("x_dimensions", x_dimensions)
        self.y_dimensions = _dimensions("y_dimensions", y_dimensions)
        if not isinstance(pixel_mapping, str) or pixel_mapping.lower() not in _MAPPINGS:
            raise ValueError(f"pixel_mapping: expected one of {', '.join(map(repr, _MAPPINGS))}, "
                             f"got {pixel_mapping!r}")
        self.pixel_mapping = pixel_mapping.lower()
        self.restarts = int_arg("restarts", restarts, 0)
        self.max_iterations = int_arg("max_iterations", max_iterations, 0)
        self.update_each_iteration = self._flag("update_each_iteration", update_each_iteration)

    # ------------------------------------------------------------- scoring
    def _score(self, xs: Tensor, y: Tensor, tgt: Optional[Tensor], rows: int):
        """(loss, fooled) of candidate images: the probability of the label (targeted: one
        minus that of the target), +inf where the logits are not finite. ``rows`` images per
        forward at most (the caller's batch size: the candidates of a batch are ``k`` times
        as many images, which need not fit the memory the batch does)."""
        with torch.no_grad():
            z = torch.cat([self.logits(xs[i:i + rows]).float() for i in range(0, xs.shape[0], rows)])
        lab = y if tgt is None else tgt
        p = z.softmax(1).gather(1, lab[:, None]).squeeze(1)
        loss = p if tgt is None else 1 - p
        return loss.masked_fill(~finite_rows(z), math.inf), self.is_success(z, y, tgt)

    @staticmethod
    def _bounds(d: Tuple[object, object], side: int) -> Tuple[int, int]:
        lo, hi = (max(1, v if isinstance(v, int) else round(side * v)) for v in d)
        if lo > hi:
            raise ValueError(f"x_dimensions/y_dimensions: the patch side range resolves to "
                             f"({lo}, {hi}) pixels on a side of {side}: expected min <= max")
        return lo, hi

    # ----------------------------------------------------------- candidates
    def _candidates(self, src: Tensor, base: Tensor, k: int, gen: torch.Generator) -> Tensor:
        """``k`` candidates per point: [m, k, C, H, W], each ``base`` with the pixels of a random
        patch of ``src`` (the clean image) copied onto other positions."""
        m, c, h, w = src.shape
        dev = src.device
        xlo, xhi = self._bounds(self.x_dimensions, w)
        ylo, yhi = self._bounds(self.y_dimensions, h)
        n = m * k
        # the patch: a corner in [0, side − 2] (int(u·(side − 1)), as torchattacks), clipped sides
        u = torch.rand(n, 2, generator=gen, device=dev)
        x0 = (u[:, 0] * (w - 1)).long()
        y0 = (u[:, 1] * (h - 1)).long()
        xo = torch.randint(xlo, xhi + 1, (n,), generator=gen, device=dev)
        yo = torch.randint(ylo, yhi + 1, (n,), generator=gen, device=dev)
        xo = torch.minimum(xo, w - x0)
        yo = torch.minimum(yo, h - y0)
        pw, ph = min(xhi, w), min(yhi, h)
        ii = torch.arange(ph, device=dev)[None, :, None]
        jj = torch.arange(pw, device=dev)[None, None, :]
        valid = ((ii < yo[:, None, None]) & (jj < xo[:, None, None])).reshape(n, -1)   # [n, S]
        rows = (y0[:, None, None] + ii).clamp(max=h - 1)
        cols = (x0[:, None, None] + jj).clamp(max=w - 1)
        spos = (rows * w + cols).reshape(n, -1)                                        # source positions
        base_k = base[:, None].expand(m, k, c, h, w).reshape(n, c, h * w)
        src_k = src.reshape(m, 1, c, h * w).expand(m, k, c, h * w).reshape(n, c, h * w)
        dest = self._destinations(src_k, base_k, spos, valid, h, w, gen)             # [n, S]
        # one source per destination: the last in the patch's row-major order wins, as the
        # sequential assignment in torchattacks does (scatter order is not defined)
        s = spos.shape[1]
        order = torch.arange(s, device=dev).expand(n, s)
        dest = torch.where(valid, dest, h * w)                                         # a spare slot
        winner = torch.full((n, h * w + 1), -1, dtype=torch.long, device=dev).scatter_reduce(
            1, dest, order, reduce="amax", include_self=True)[:, :h * w]
        take = winner >= 0
        from_pos = spos.gather(1, winner.clamp_min(0))                                # [n, HW]
        moved = src_k.gather(2, from_pos[:, None, :].expand(n, c, h * w))
        out = torch.where(take[:, None, :], moved, base_k)
        return out.reshape(m, k, c, h, w)

    def _destinations(self, src: Tensor, base: Tensor, spos: Tensor, valid: Tensor, h: int, w: int,
                      gen: torch.Generator) -> Tensor:
        """Where each source pixel goes: [n, S] flat positions."""
        n, s = spos.shape
        dev = spos.device
        if self.pixel_mapping == "random":
            u = torch.rand(n, s, 2, generator=gen, device=dev)
            return (u[..., 0] * (h - 1)).long() * w + (u[..., 1] * (w - 1)).long()
        c = src.shape[1]
        pix = src.gather(2, spos[:, None, :].expand(n, c, s))                          # [n, C, S]
        out = torch.empty(n, s, dtype=torch.long, device=dev)
        step = max(1, (1 << 22) // max(1, s * h * w))        # rows per block: ~4M distances
        for i in range(0, n, step):
            blk = slice(i, min(i + step, n))
            diff = (base[blk, :, None, :] - pix[blk, :, :, None]).abs().mean(1)        # [r, S, HW]
            if "similarity" in self.pixel_mapping:
                diff = 1 / (1 + diff)
                diff = diff.masked_fill(diff == 1, 0.0)
            own = torch.nn.functional.one_hot(spos[blk], h * w).bool()
            if "random" in self.pixel_mapping:
                # drawn from the softmax, redrawn when it is the pixel's own position:
                # the softmax with that position removed
                prob = diff.softmax(2).masked_fill(own, 0.0)
                pick = torch.multinomial(prob.reshape(-1, h * w), 1, generator=gen).reshape(prob.shape[:2])
            else:
                pick = diff.masked_fill(own, -math.inf).argmax(2)
            out[blk] = pick
        return out

    # ---------------------------------------------------------------- the run
    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        if x.dim() != 4:
            raise ValueError(f"Pixle: expected image batches [B, C, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        dev = x.device
        z0 = self.clean_logits
        lab = y if target is None else target
        p0 = z0.softmax(1).gather(1, lab[:, None]).squeeze(1)
        best_p = (p0 if target is None else 1 - p0).masked_fill(~finite_rows(z0), math.inf)
        x_adv = x.clone()
        loss_out = best_p.clone()
        queries = torch.zeros(b, dtype=torch.long, device=dev)
        W = Working(torch.arange(b, device=dev), src=x.contiguous(), y=y, tgt=target, base=x.contiguous(),
                    base_p=best_p, best_p=best_p, best=x.contiguous(),
                    found=torch.zeros(b, dtype=torch.bool, device=dev))
        W.compact(~self.is_success(z0, y, target))
        if self.update_each_iteration:
            rounds, k = self.max_iterations, 1
        else:
            rounds, k = self.restarts, self.max_iterations
        if k == 0:
            rounds = 0
        for _ in range(rounds):
            m = len(W)
            if m == 0:
                break
            cand = self._candidates(W.src, W.base, k, gen)                             # [m, k, C, H, W]
            loss, fooled = self._score(cand.reshape(m * k, *cand.shape[2:]), W.y.repeat_interleave(k),
                                       None if W.tgt is None else W.tgt.repeat_interleave(k), max(b, 1))
            loss, fooled = loss.reshape(m, k), fooled.reshape(m, k)
            queries.index_add_(0, W.idx, torch.full((m,), k, dtype=torch.long, device=dev))
            ar = torch.arange(m, device=dev)
            lo, j = loss.min(1)
            better = lo < W.best_p
            W.best_p = torch.where(better, lo, W.best_p)
            W.best = torch.where(better.view(-1, 1, 1, 1), cand[ar, j], W.best)
            W.found = W.found | better
            if self.update_each_iteration:
                W.base, W.base_p = W.best, W.best_p
            else:
                # torchattacks: a restart goes on from the best so far, or, while no candidate
                # has lowered the loss yet, from the last candidate
                W.base = torch.where(W.found.view(-1, 1, 1, 1), W.best, cand[:, -1])
                W.base_p = torch.where(W.found, W.best_p, loss[:, -1])
            hit = fooled.any(1)
            if bool(hit.any()):
                rows = hit.nonzero().squeeze(1)
                first = fooled.float().argmax(1).index_select(0, rows)
                ids = W.idx.index_select(0, rows)
                x_adv.index_copy_(0, ids, cand[rows, first])
                loss_out.index_copy_(0, ids, loss[rows, first])
                W.compact(~hit)
        if len(W):
            x_adv.index_copy_(0, W.idx, W.base)
            loss_out.index_copy_(0, W.idx, W.base_p)
        with torch.no_grad():
            z = self.exact_logits(x_adv, y)
        success = self.is_success(z, y, target)
        return AttackResult(x_adv, success, -loss_out.float(), queries.clone(), extra={"queries": queries, **returned_nonfinite(z)})
