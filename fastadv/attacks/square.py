"""Square Attack (Andriushchenko et al. 2020): score-based random search with square updates.

Black-box (logits only, no gradients): each query changes one random square
window per image; the change is kept if the margin loss drops. The window side
shrinks on the paper's schedule for p (fraction of pixels changed). Every image
draws its own window (the reference port draws one per batch), the search is
batched over all points and restarts, and fooled points leave the batch.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

from ._groups import (Working, channels_last, entry_chunks, finite_rows, group_any, lp_norm,
                      norm_name, pick_per_group, success_margin, view_rows)
from .base import int_arg
from .base import Attack, AttackResult

__all__ = ["Square", "p_selection", "square_meta_pattern"]

_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = True) -> float:
    """The fraction p of pixels changed at iteration ``it``: halved at iterations
    10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10,000-query schedule
    (rescaled to ``n_queries`` when ``rescale``)."""
    if rescale:
        it = int(it / n_queries * 10000)
    div = 512
    for bound, d in _P_SCHEDULE:
        if it <= bound:
            div = d
            break
    return p_init / div


def square_meta_pattern(s: int, device=None) -> Tensor:
    """The L2 update's s×s pattern: two stacked blocks of concentric rectangles with
    weights Σ 1/(k+1)², the lower block negated, unit L2 norm (Andriushchenko et al., §3.2)."""
    def block(r: int, c: int) -> Tensor:
        if r == 0:
            return torch.zeros(0, c, device=device)
        ci, cj = r // 2, c // 2  # the centre
        n_rect = max(ci + 1, cj + 1)
        ii = torch.arange(r, device=device)[:, None]
        jj = torch.arange(c, device=device)[None, :]
        dist = torch.maximum((ii - ci).abs(), (jj - cj).abs())
        w = 1.0 / torch.arange(1, n_rect + 1, device=device, dtype=torch.float32) ** 2
        tail = w.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k>=d} w_k
        out = tail[dist.clamp(max=n_rect - 1)]
        return out / out.norm().clamp_min(1e-12)
    top = block(s // 2, s)
    bottom = -block(s - s // 2, s)
    eta = torch.cat((top, bottom), 0)
    return eta / eta.norm().clamp_min(1e-12)


class Square(Attack):
    """Square Attack, L∞ or L2, with the reference defaults (5000 queries, p_init = 0.8,
    margin loss, rescaled schedule, one restart). Needs image-shaped input [B, C, H, W].

    ``extra["queries"]`` counts the model queries spent per point."""

    uses_gradients = False  # queries only: a model without gradients is fine

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, n_queries: int = 5000,
                 n_restarts: int = 1, p_init: float = 0.8, loss: str = "margin",
                 resc_schedule: bool = True, seed: Optional[int] = 0, verbose: bool = False, *,
                 early_stop: bool = True, max_rows: Optional[int] = None,
                 compact_every: Optional[int] = None, resample_unchanged: bool = True, **kwargs):
        if loss not in ("margin", "ce"):
            raise ValueError(f"loss: expected 'margin' or 'ce', got {loss!r}")
        super().__init__(kwargs.pop("name", "Square"), model, eps=eps, seed=seed, **kwargs)
        self.norm = norm_name(norm)
        if self.norm == "L1":
            raise ValueError("Square: norm 'L1' is not supported (use 'Linf' or 'L2')")
        self.n_queries = int_arg("n_queries", n_queries, 0)
        self.n_restarts = int_arg("n_restarts", n_restarts)
        p_init = self._real("p_init", p_init)
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init: expected a value in (0, 1], got {p_init}")
        self.p_init = p_init
        self.square_loss = loss
        self.rescale_schedule = self._flag("resc_schedule", resc_schedule)
        self.verbose = self._flag("verbose", verbose)
        self.early_stop = self._flag("early_stop", early_stop)
        self.max_rows = None if max_rows is None else int_arg("max_rows", max_rows)
        self.compact_every = None if compact_every is None else int_arg("compact_every", compact_every)
        self.resample_unchanged = self._flag("resample_unchanged", resample_unchanged)

    # ------------------------------------------------------------- loss
    def _margin_and_loss(self, x: Tensor, y: Tensor, tgt: Optional[Tensor]):
        """(margin, loss): margin ≤ 0 means success; the search minimises loss. Logits that
        are not finite give +inf for both: never a success, worse than any finite query."""
        if self._use_channels_last(x):
            x = channels_last(x)  # a free view for one channel, a copy otherwise
        with torch.no_grad():
            z = self.logits(x).float()
        lab = y if tgt is None else tgt
        margin = self._margin(z, y, tgt)
        bad = ~finite_rows(z)
        margin = margin.masked_fill(bad, math.inf)
        if self.square_loss == "margin":
            return margin, margin
        ce = torch.nn.functional.cross_entropy(z, lab, reduction="none")
        return margin, (-ce if tgt is None else ce).masked_fill(bad, math.inf)

    _margin = staticmethod(success_margin)  # z_label − max_other (max_other − z_target)

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        return (self._margin(z, y, target) <= 0) & finite_rows(z)

    # ------------------------------------------------------- random bits
    @staticmethod
    def _signs(shape, like: Tensor, gen: torch.Generator) -> Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype).mul_(2).sub_(1)

    @staticmethod
    def _corners(n: int, h: int, w: int, s: int, dev, gen: torch.Generator):
        # top-left corners in {0, ..., h−s−1} as in the reference (never the last position)
        vh = torch.randint(0, max(h - s, 1), (n,), generator=gen, device=dev)
        vw = torch.randint(0, max(w - s, 1), (n,), generator=gen, device=dev)
        return vh, vw

    @staticmethod
    def _window(vh: Tensor, vw: Tensor, s: int, h: int, w: int) -> Tensor:
        """[n, 1, h, w] bool: the s×s window at each row's corner."""
        ii = torch.arange(h, device=vh.device)[None, :]
        jj = torch.arange(w, device=vh.device)[None, :]
        rows = ((ii >= vh[:, None]) & (ii < vh[:, None] + s))[:, None, :, None]
        cols = ((jj >= vw[:, None]) & (jj < vw[:, None] + s))[:, None, None, :]
        return rows & cols

    def _flip_unchanged(self, sg: Tensor, same: Tensor, gen: torch.Generator) -> Tensor:
        """New signs for rows whose window would not change: XOR with a random non-zero
        pattern, i.e. uniform over the other sign patterns (what redrawing until the
        window changes gives, in one draw)."""
        m, c = sg.shape[0], sg.shape[1]
        if c == 1:
            return torch.where(same.view(-1, 1, 1, 1), -sg, sg)
        r = torch.randint(0, 2, (m, c), generator=gen, device=sg.device).bool()
        none = ~r.any(1)
        # an all-zero pattern (probability 2^-c) becomes one random flipped channel
        j = torch.randint(0, c, (m,), generator=gen, device=sg.device)
        r = r | (none[:, None] & (torch.arange(c, device=sg.device)[None, :] == j[:, None]))
        flip = r & same[:, None]
        return torch.where(flip.reshape(sg.shape), -sg, sg)

    # ------------------------------------------------------------ L∞
    def _search_linf(self, W: Working, R, n_groups: int, gen: torch.Generator) -> None:
        """Each query rewrites one s×s window per image to x ± eps (a random sign per
        channel). Only the windows are gathered and written back: per query the full
        images are copied once (the model's input) and nothing else touches them."""
        lo, hi = self.lower, self.upper
        n, c, h, w = W.xn.shape
        n_fts = c * h * w
        dev = W.xn.device
        every = self.compact_every or (10 if dev.type == "cuda" else 1)
        ch = torch.arange(c, device=dev)[None, :, None, None] * (h * w)
        grids: Dict[int, Tensor] = {}  # per window size: the [1, c, s, s] offsets of a window at 0
        for it in range(self.n_queries):
            if len(W) == 0:
                break
            m = len(W)
            p = p_selection(self.p_init, it, self.n_queries, self.rescale_schedule)
            s = min(max(int(round(math.sqrt(p * n_fts / c))), 1), h, w)
            vh, vw = self._corners(m, h, w, s, dev, gen)
            grid = grids.get(s)
            if grid is None:
                ar = torch.arange(s, device=dev)
                grid = grids[s] = ch + ar[None, None, :, None] * w + ar[None, None, None, :]
            off = (grid + (vh * w + vw)[:, None, None, None]).reshape(m, -1)
            xb = W.x_best.reshape(m, -1)
            old = xb.gather(1, off).reshape(m, c, s, s)
            nat = W.xn.reshape(m, -1).gather(1, off).reshape(m, c, s, s)
            e = view_rows(W.eps, nat)
            sg = self._signs((m, c, 1, 1), nat, gen)
            new = (nat + e * sg).clamp_(lo, hi)
            if self.resample_unchanged:
                # a window that changes nothing wastes a query: give it other signs
                same = (new == old).reshape(m, -1).all(1)
                sg = self._flip_unchanged(sg, same, gen)
                new = (nat + e * sg).clamp_(lo, hi)
            x_new = W.x_best.clone()
            x_new.reshape(m, -1).scatter_(1, off, new.reshape(m, -1))
            take = self._accept_rows(W, x_new)
            xb.scatter_(1, off, torch.where(view_rows(take, new), new, old).reshape(m, -1))
            if self.early_stop and (it + 1) % every == 0:
                self._compact(W, R, n_groups)

    # -------------------------------------------------------------- L2
    def _place(self, pattern: Tensor, vh: Tensor, vw: Tensor, s: int, h: int, w: int) -> Tensor:
        """[n, 1, h, w]: the s×s ``pattern`` placed at each row's corner, 0 elsewhere."""
        ii = torch.arange(h, device=vh.device)[None, :, None]
        jj = torch.arange(w, device=vh.device)[None, None, :]
        ri = ii - vh[:, None, None]
        rj = jj - vw[:, None, None]
        inside = (ri >= 0) & (ri < s) & (rj >= 0) & (rj < s)
        flat = pattern.reshape(-1)
        vals = flat[(ri.clamp(0, s - 1) * s + rj.clamp(0, s - 1))]
        return torch.where(inside, vals, torch.zeros_like(vals))[:, None]

    def _eta_batch(self, n: int, s: int, dev, gen: torch.Generator) -> Tensor:
        """n copies of the meta pattern, each transposed with probability 1/2: [n, s, s]."""
        eta = square_meta_pattern(s, dev)
        flip = torch.rand(n, generator=gen, device=dev) > 0.5
        return torch.where(flip[:, None, None], eta.t()[None], eta[None])

    def _init_l2(self, xn: Tensor, eps: Tensor, gen: torch.Generator) -> Tensor:
        n, c, h, w = xn.shape
        s = max(h // 5, 1)
        sp = (h - s * 5) // 2
        delta = torch.zeros_like(xn)
        vh = sp
        for _ in range(h // s):
            vw = sp
            for _ in range(w // s):
                if vh + s <= h and vw + s <= w:
                    eta = self._eta_batch(n, s, xn.device, gen)[:, None]
                    delta[:, :, vh:vh + s, vw:vw + s] += eta * self._signs((n, c, 1, 1), xn, gen)
                vw += s
            vh += s
        delta = delta / view_rows(lp_norm(delta, "L2").clamp_min(1e-12), xn)
        return (xn + delta * view_rows(eps, xn)).clamp(self.lower, self.upper)

    def _search_l2(self, W: Working, R, n_groups: int, gen: torch.Generator) -> None:
        lo, hi = self.lower, self.upper
        n, c, h, w = W.xn.shape
        n_fts = c * h * w
        every = self.compact_every or (10 if W.xn.device.type == "cuda" else 1)
        for it in range(self.n_queries):
            if len(W) == 0:
                break
            m = len(W)
            dev = W.xn.device
            delta = W.x_best - W.xn
            p = p_selection(self.p_init, it, self.n_queries, self.rescale_schedule)
            s = max(int(round(math.sqrt(p * n_fts / c))), 3)
            if s % 2 == 0:
                s += 1
            s = min(s, h, w)
            vh, vw = self._corners(m, h, w, s, dev, gen)
            vh2, vw2 = self._corners(m, h, w, s, dev, gen)
            win1 = self._window(vh, vw, s, h, w)
            win2 = self._window(vh2, vw2, s, h, w)
            e = W.eps
            norm_img = lp_norm(delta, "L2")
            norm_both = lp_norm(delta * (win1 | win2), "L2")
            d1 = delta * win1
            n1 = d1.pow(2).sum((2, 3), keepdim=True).sqrt()  # per channel
            pattern = square_meta_pattern(s, dev)
            eta = self._place(pattern, vh, vw, s, h, w)
            flip = torch.rand(m, generator=gen, device=dev) > 0.5  # transposed pattern half the time
            eta = torch.where(view_rows(flip, eta), self._place(pattern.t().contiguous(), vh, vw, s, h, w), eta)
            new = eta * self._signs((m, c, 1, 1), W.xn, gen) + d1 / (n1 + 1e-12)
            new_norm = new.pow(2).sum((2, 3), keepdim=True).sqrt()
            budget = ((e ** 2 - norm_img ** 2).clamp_min(0.0) / c + norm_both ** 2).sqrt()
            new = new / (new_norm + 1e-12) * view_rows(budget, new)
            delta = torch.where(win2, torch.zeros_like(delta), delta)
            delta = torch.where(win1, new, delta)
            delta = delta / view_rows(lp_norm(delta, "L2").clamp_min(1e-12), delta) * view_rows(e, delta)
            x_new = (W.xn + delta).clamp(lo, hi)
            self._accept(W, x_new)
            if self.early_stop and (it + 1) % every == 0:
                self._compact(W, R, n_groups)

    # ------------------------------------------------------------ shared
    def _accept_rows(self, W: Working, x_new: Tensor) -> Tensor:
        """Query x_new; update the loss and margin of rows that improve (or are fooled)
        and return which rows take x_new."""
        margin, loss = self._margin_and_loss(x_new, W.y, W.tgt)
        active = W.margin > 0
        W.queries += active
        W.bad |= (margin == math.inf) & active  # +inf only from non-finite logits
        improved = (loss < W.loss) & active
        W.loss = torch.where(improved, loss, W.loss)
        take = (improved | (margin <= 0)) & active
        W.margin = torch.where(take, margin, W.margin)
        return take

    def _accept(self, W: Working, x_new: Tensor) -> None:
        take = self._accept_rows(W, x_new)
        W.x_best = torch.where(view_rows(take, x_new), x_new, W.x_best)

    def _compact(self, W: Working, R, n_groups: int, force: bool = False) -> None:
        done = W.margin <= 0
        if R["margin"].shape[0] != n_groups:  # rows per point > 1: done when any of them is
            done = group_any(done, W.group, n_groups)[W.group]
        n_drop = int(done.sum())
        if n_drop == 0 or (not force and n_drop * 16 < len(W)):
            return
        self._retire(W, R, done.nonzero().squeeze(1))
        W.compact(~done)

    @staticmethod
    def _retire(W: Working, R, rows: Tensor) -> None:
        if rows.numel() == 0:
            return
        ids = W.idx.index_select(0, rows)
        R["x"].index_copy_(0, ids, W.x_best.index_select(0, rows))
        R["margin"].index_copy_(0, ids, W.margin.index_select(0, rows))
        R["loss"].index_copy_(0, ids, W.loss.index_select(0, rows))
        R["queries"].index_copy_(0, ids, W.queries.index_select(0, rows))
        R["nonfinite"].index_copy_(0, ids, W.bad.index_select(0, rows))

    def _optimize(self, xn: Tensor, y: Tensor, tgt: Optional[Tensor], eps: Tensor, group: Tensor,
                  n_groups: int, gen: torch.Generator) -> Dict[str, Tensor]:
        xn = xn.contiguous()  # the window arithmetic indexes NCHW memory
        n, c, h, w = xn.shape
        dev = xn.device
        if self.norm == "Linf":
            x0 = (xn + view_rows(eps, xn) * self._signs((n, c, 1, w), xn, gen)).clamp(self.lower, self.upper)
        else:
            x0 = self._init_l2(xn, eps, gen)
        margin, loss = self._margin_and_loss(x0, y, tgt)
        W = Working(torch.arange(n, device=dev), xn=xn, y=y, tgt=tgt, eps=eps, group=group, x_best=x0,
                    margin=margin, loss=loss, queries=torch.ones(n, dtype=torch.long, device=dev),
                    bad=margin == math.inf)
        R = {"x": x0.clone(), "margin": margin.clone(), "loss": loss.clone(),
             "queries": torch.ones(n, dtype=torch.long, device=dev), "nonfinite": W.bad.clone()}
        if self.early_stop:
            self._compact(W, R, n_groups, force=True)
        if self.norm == "Linf":
            self._search_linf(W, R, n_groups, gen)
        else:
            self._search_l2(W, R, n_groups, gen)
        self._retire(W, R, torch.arange(len(W), device=dev))
        return R

    # ------------------------------------------------------------- call
    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor],
                gen: torch.Generator) -> AttackResult:
        return self._run_points(x, y, target, gen, torch.full((x.shape[0],), self.eps, device=x.device))

    def _run_points(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator,
                    eps: Tensor) -> AttackResult:
        if x.dim() != 4:
            raise ValueError(f"Square: expected image batches [B, C, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        dev = x.device
        margin0, loss0 = self._margin_and_loss(x, y, target)
        done = margin0 <= 0
        x_adv = x.clone()
        success = done.clone()
        loss = loss0.clone()
        queries = torch.zeros(b, dtype=torch.long, device=dev)
        nonfinite = torch.zeros(b, dtype=torch.bool, device=dev)
        todo = (~done).nonzero().squeeze(1)
        tg = None if target is None else target[:, None]
        for E in entry_chunks(todo, x, y, tg, eps, self.n_restarts, self.max_rows):
            m, pts = E.n_points, E.pts
            R = self._optimize(E.x, E.y, E.target, E.eps, E.group, m, gen)
            idx, gs = pick_per_group(E.group, m, R["margin"] <= 0, -R["loss"])
            # a point with no finite logits anywhere (loss +inf) keeps its clean point
            found = R["loss"].index_select(0, idx) < math.inf
            x_adv.index_copy_(0, pts, torch.where(view_rows(found, x), R["x"].index_select(0, idx),
                                                  x.index_select(0, pts)))
            success.index_copy_(0, pts, gs)
            loss.index_copy_(0, pts, torch.where(found, R["loss"].index_select(0, idx), loss.index_select(0, pts)))
            queries.index_copy_(0, pts, E.per_point_sum(R["queries"]))
            nonfinite.index_copy_(0, pts, group_any(R["nonfinite"], E.group, m))
        if self.verbose:
            print(f"Square: robust accuracy {1 - success.float().mean().item():.2%} on {b} points")
        # steps: model queries (Square uses no gradients)
        return AttackResult(x_adv, success, -loss, queries, extra={"queries": queries, "norm": self.norm,
                                                                   "nonfinite": nonfinite})
