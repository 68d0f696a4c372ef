"""FAB and FAB-T (Croce & Hein 2020): minimum-norm adversarial examples by adaptive boundary projection.

Each step linearises the decision boundary between the true class and a target
(FAB-T) or the closest class (FAB), projects both the iterate and the original
point onto that hyperplane inside the box, and moves to a convex combination of
the two projections (with overshoot η); an adversarial iterate is pulled back
towards the original point by β. Restarts and target classes run as one batch,
and with ``early_stop`` a point leaves as soon as one of its rows finds an
adversarial example within ``eps``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

from ._groups import (Working, channels_last, chunked_loss_and_grad, entry_chunks, finite_rows,
                      forward_rows, group_any, lp_norm, norm_name, pick_per_group, view_rows)
from ._workers import split_count, split_rows
from .apgd import l1_project_delta
from .base import int_arg
from .base import Attack, AttackResult

__all__ = ["FAB", "FABT", "project_onto_hyperplane"]


# -------------------------------------------------------------- projections
def _sort_nonneg_rows(u: Tensor):
    """(values, indices) of ``u`` (>= 0) sorted along dim 1. On a CPU, through numpy's
    SIMD sort of packed int64 keys (value bits << 32 | column): for non-negative floats the
    bit pattern orders like the value, and sorting the keys alone is ~2.5x faster here than
    ``torch.sort``, which also tracks indices. Ties come out in column order."""
    if u.device.type != "cpu" or u.dtype != torch.float32 or u.dim() != 2 or u.shape[1] >= 2 ** 31:
        return u.sort(1)
    bits = (u + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0: no -0.0 bit pattern
    keys = (bits << 32) | torch.arange(u.shape[1], dtype=torch.int64)
    k = split_count(keys, None, model=False)
    if k > 1:  # numpy sorts on one thread (without the GIL): row blocks on the workers
        ks = torch.cat(split_rows(lambda s: torch.from_numpy(np.sort(keys[s].numpy(), axis=1)), len(keys), k))
    else:
        ks = torch.from_numpy(np.sort(keys.numpy(), axis=1))
    return (ks >> 32).to(torch.int32).view(torch.float32), ks & 0xFFFFFFFF


def _waterfill(a: Tensor, u: Tensor, c: Tensor) -> Tensor:
    """λ ≥ 0 per row with Σ_i a_i·min(λ, u_i) = c (a, u ≥ 0, c ≥ 0), or max(u) if out of reach.

    g(λ) = Σ a_i·min(λ, u_i) is piecewise linear and non-decreasing; evaluating it at the
    sorted u gives the segment holding c, and λ follows by linear interpolation."""
    us, order = _sort_nonneg_rows(u)
    as_ = a.gather(1, order)
    cum_a = as_.cumsum(1)
    cum_au = (as_ * us).cumsum(1)
    total = cum_a[:, -1:]
    g = cum_au + us * (total - cum_a)
    k = torch.searchsorted(g.contiguous(), c[:, None].contiguous()).squeeze(1)
    d = u.shape[1]
    kk = (k - 1).clamp(min=0)
    prev_au = torch.where(k > 0, cum_au.gather(1, kk[:, None]).squeeze(1), torch.zeros_like(c))
    prev_a = torch.where(k > 0, cum_a.gather(1, kk[:, None]).squeeze(1), torch.zeros_like(c))
    rest = (total.squeeze(1) - prev_a).clamp_min(1e-30)
    lam = ((c - prev_au) / rest).clamp_min(0.0)
    return torch.where(k >= d, us[:, -1], lam)


def project_onto_hyperplane(t: Tensor, w: Tensor, b: Tensor, norm: str, lower: float = 0.0,
                            upper: float = 1.0) -> Tensor:
    """The smallest step d (in Lp) with ⟨w, t + d⟩ = b and lower ≤ t + d ≤ upper, per row.

    ``t``, ``w``: [N, D]; ``b``: [N]. Where the hyperplane cannot be reached inside the
    box, the step that gets closest (every coordinate at its bound) is returned.
    L∞: d_i = sign(w_i)·min(λ, room_i); L2: d_i = w_i·min(λ, room_i/|w_i|);
    L1: the coordinates with the largest |w_i| are used first."""
    t = t.float()
    w = w.float()
    c = b.float() - (w * t).sum(1)
    flip = c < 0
    sgn = torch.where(flip, -1.0, 1.0)[:, None]
    w = w * sgn
    c = c.abs()
    room = torch.where(w > 0, upper - t, t - lower).clamp_min(0.0)
    room = torch.where(w != 0, room, torch.zeros_like(room))
    aw = w.abs()
    if norm == "Linf":
        lam = _waterfill(aw, room, c)
        d = torch.sign(w) * torch.minimum(lam[:, None], room)
    elif norm == "L2":
        ratio = torch.where(aw > 0, room / aw.clamp_min(1e-30), torch.zeros_like(room))
        lam = _waterfill(aw * aw, ratio, c)
        d = w * torch.minimum(lam[:, None], ratio)
    else:
        # greedy: spend the L1 budget on the largest |w_i| first
        ws, order = aw.sort(1, descending=True)
        rs = room.gather(1, order)
        gain = (ws * rs).cumsum(1)
        k = torch.searchsorted(gain.contiguous(), c[:, None].contiguous()).squeeze(1)
        dim = w.shape[1]
        pos = torch.arange(dim, device=w.device)[None, :]
        prev = torch.where(k > 0, gain.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1),
                           torch.zeros_like(c))
        kk = k.clamp(max=dim - 1)
        part = ((c - prev) / ws.gather(1, kk[:, None]).squeeze(1).clamp_min(1e-30)).clamp_min(0.0)
        part = torch.minimum(part, rs.gather(1, kk[:, None]).squeeze(1))
        mag_s = torch.where(pos < k[:, None], rs, torch.zeros_like(rs))
        mag_s = torch.where((pos == k[:, None]) & (k[:, None] < dim), part[:, None], mag_s)
        mag = torch.zeros_like(mag_s).scatter_(1, order, mag_s)
        d = torch.sign(w) * mag
    return d


def _dual_norm(g: Tensor, norm: str) -> Tensor:
    """‖g‖_q with q the dual of p, over the last dimension."""
    if norm == "Linf":
        return g.abs().sum(-1)
    if norm == "L2":
        return torch.linalg.vector_norm(g, 2, dim=-1)
    return g.abs().amax(-1)


# ----------------------------------------------------------------------- FAB
class FAB(Attack):
    """FAB (Croce & Hein 2020): untargeted (closest linearised class) or, with
    ``multi_targeted=True``, FAB-T over the top ``n_target_classes`` classes.

    Defaults follow torchattacks (``steps=10``; AutoAttack runs it with the reference's
    100) and the reference: α_max = 0.1, η = 1.05, β = 0.9, restarts start at a random
    point at distance ``min(eps, best)/2``. ``norm``: "Linf", "L2" or "L1". A point
    counts as fooled when an adversarial example within ``eps`` (in ``norm``) is
    found: misclassified, or, given a target (``run(x, y, target)``, the targeted modes),
    classified as that target; ``extra["min_norm"]`` has the smallest adversarial norm
    found (inf if none). ``n_iter`` is ``steps`` under the reference's name.
    ``n_target_classes`` (FAB-T) defaults to ``n_classes - 1`` when ``n_classes`` is
    given, as in torchattacks, else 9.
    ``early_stop`` stops a point at its first adversarial example within eps
    (set it to False to keep minimising the norm)."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 verbose: bool = False, seed: Optional[int] = 0, multi_targeted: bool = False,
                 n_classes: Optional[int] = None, *, n_target_classes: Optional[int] = None,
                 early_stop: bool = True, max_rows: Optional[int] = None,
                 compact_every: Optional[int] = None, **kwargs):
        super().__init__(kwargs.pop("name", "FAB"), model, eps=eps, seed=seed, **kwargs)
        self.norm = norm_name(norm)
        self.steps = int_arg("steps", steps, 0)
        self.n_restarts = int_arg("n_restarts", n_restarts)
        self.alpha_max = self._real("alpha_max", alpha_max)
        self.eta = self._real("eta", eta)
        self.beta = self._real("beta", beta)
        if not 0 <= self.alpha_max <= 1:
            raise ValueError(f"alpha_max: expected a value in [0, 1], got {alpha_max}")
        if not 1 <= self.eta < math.inf:
            raise ValueError(f"eta: expected a finite value >= 1, got {eta}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta: expected a value in (0, 1], got {beta}")
        self.verbose = self._flag("verbose", verbose)
        self.multi_targeted = self._flag("multi_targeted", multi_targeted)
        self.n_classes = None if n_classes is None else int_arg("n_classes", n_classes, 2)
        if n_target_classes is None:  # torchattacks: every class but the true one
            n_target_classes = 9 if n_classes is None else n_classes - 1
        self.n_target_classes = int_arg("n_target_classes", n_target_classes)
        self.early_stop = self._flag("early_stop", early_stop)
        self.max_rows = None if max_rows is None else int_arg("max_rows", max_rows)
        self.compact_every = None if compact_every is None else int_arg("compact_every", compact_every)

    @property
    def n_iter(self) -> int:
        """``steps`` under the reference's name (``adversary.fab.n_iter``)."""
        return self.steps

    @n_iter.setter
    def n_iter(self, v) -> None:
        self.steps = int_arg("n_iter", v, 0)

    # ------------------------------------------------------------ gradients
    def _diff_and_grad(self, x: Tensor, y: Tensor, tgt: Optional[Tensor]):
        """(f, g): f = z_s − z_y and its input gradient g for the class s to move to.
        Targeted: s = target; untargeted: the class whose
        linearised boundary is closest (this needs the gradient of every class).
        With a target to reach (not FAB-T's helper targets), the class to overtake is the
        strongest other one, z_s − max_{k≠s} z_k: the boundary that stands between the
        iterate and the target, whatever class holds it now."""
        if tgt is not None:
            if self.__dict__.get("_reach_target"):
                def fn(z, y_, t_):
                    zt = z.gather(1, t_[:, None]).squeeze(1)
                    return zt - z.scatter(1, t_[:, None], -math.inf).amax(1)
            else:
                def fn(z, y_, t_):
                    return z.gather(1, t_[:, None]).squeeze(1) - z.gather(1, y_[:, None]).squeeze(1)
            f, _, g = chunked_loss_and_grad(self, x, y, tgt, fn, self.__dict__.get("_rows"))
            return f, g
        n_cls = self._n_cls
        n = x.shape[0]
        xr = x.repeat_interleave(n_cls, 0)
        yr = y.repeat_interleave(n_cls, 0)
        kr = torch.arange(n_cls, device=x.device).repeat(n)

        def fn_all(z, y_, k_):
            return z.gather(1, k_[:, None]).squeeze(1) - z.gather(1, y_[:, None]).squeeze(1)
        f, _, g = chunked_loss_and_grad(self, xr, yr, kr, fn_all, self.__dict__.get("_rows"))
        f = f.reshape(n, n_cls)
        g = g.reshape(n, n_cls, -1)
        dist = f.abs() / (_dual_norm(g, self.norm) + 1e-12)
        dist = dist.scatter(1, y[:, None], math.inf)
        s = dist.argmin(1)
        u = torch.arange(n, device=x.device)
        return f[u, s], g[u, s].reshape(x.shape)

    def _random_start(self, xn: Tensor, radius: Tensor, gen: torch.Generator) -> Tensor:
        r = view_rows(radius, xn)
        if self.norm == "Linf":
            t = torch.empty_like(xn).uniform_(-1.0, 1.0, generator=gen)
        else:
            t = torch.empty_like(xn).normal_(generator=gen)
        t = t / view_rows(lp_norm(t, self.norm).clamp_min(1e-12), xn)
        return (xn + r * t * 0.5).clamp_(self.lower, self.upper)

    # ------------------------------------------------------------ the core
    def _optimize(self, xn: Tensor, y: Tensor, tgt: Optional[Tensor], eps: Tensor, rand: Tensor,
                  group: Tensor, n_groups: int, gen: torch.Generator) -> Dict[str, Tensor]:
        cl = self._use_channels_last(xn)
        if cl:
            xn = channels_last(xn)
        n = xn.shape[0]
        dev = xn.device
        lo, hi = self.lower, self.upper
        x1 = xn.clone()
        if bool(rand.any()):
            xr = self._random_start(xn, eps, gen)
            x1 = torch.where(view_rows(rand, xn), xr, x1)
        W = Working(torch.arange(n, device=dev), xn=xn, y=y, tgt=tgt, eps=eps, group=group, x=x1,
                    best=torch.full((n,), math.inf, device=dev), x_out=xn.clone(),
                    n_steps=torch.zeros(n, dtype=torch.long, device=dev),
                    bad=torch.zeros(n, dtype=torch.bool, device=dev))
        R = {"x": xn.clone(), "norm": torch.full((n,), math.inf, device=dev),
             "steps": torch.zeros(n, dtype=torch.long, device=dev),
             "nonfinite": torch.zeros(n, dtype=torch.bool, device=dev)}
        every = self.compact_every or (10 if dev.type == "cuda" else 1)
        self._rows = forward_rows(self, xn, y, tgt) if self.max_rows is None else self.max_rows
        for i in range(self.steps):
            if len(W) == 0:
                break
            m = len(W)
            f, g = self._diff_and_grad(W.x, W.y, W.tgt)
            with torch.no_grad():
                w = g.reshape(m, -1).float()
                xf = W.x.reshape(m, -1).float()
                x0 = W.xn.reshape(m, -1).float()
                b = (w * xf).sum(1) - f
                d = project_onto_hyperplane(torch.cat((xf, x0)), torch.cat((w, w)), torch.cat((b, b)),
                                            self.norm, lo, hi)
                d1, d2 = d[:m], d[m:]
                a1 = lp_norm(d1, self.norm).clamp_min(1e-8)
                a2 = lp_norm(d2, self.norm).clamp_min(1e-8)
                alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max)[:, None]
                xnew = ((xf + self.eta * d1) * (1 - alpha) + (x0 + self.eta * d2) * alpha).clamp(lo, hi)
                xnew = xnew.reshape(W.x.shape).to(W.x.dtype)
                # non-finite logits at W.x (f NaN): no boundary to project on, stay
                xnew = torch.where(view_rows(torch.isfinite(f), xnew), xnew, W.x)
                if cl:
                    xnew = channels_last(xnew)
                rows = self.__dict__.get("_rows") or m
                z = torch.cat([self.logits(xnew[r:r + rows]).float() for r in range(0, m, rows)])
                fin = finite_rows(z)
                W.bad = W.bad | ~fin | ~torch.isfinite(f)
                adv = self._fooled(z, W.y, W.tgt) & fin
                dist = lp_norm(xnew - W.xn, self.norm)
                better = adv & (dist < W.best)
                W.x_out = torch.where(view_rows(better, xnew), xnew, W.x_out)
                W.best = torch.where(better, dist, W.best)
                # an adversarial iterate is pulled back towards the original point
                back = W.xn + (xnew - W.xn) * self.beta
                # a point with non-finite logits is not stepped onto
                W.x = torch.where(view_rows(adv, xnew), back, torch.where(view_rows(fin, xnew), xnew, W.x))
                W.n_steps += 1
                if self.early_stop and (i + 1) % every == 0:
                    done = group_any(W.best <= W.eps, W.group, n_groups)[W.group]
                    n_drop = int(done.sum())
                    if n_drop and (n_drop * 16 >= m or i + 1 == self.steps):
                        self._retire(W, R, done.nonzero().squeeze(1))
                        W.compact(~done)
        self._retire(W, R, torch.arange(len(W), device=dev))
        return R

    def _fooled(self, z: Tensor, y: Tensor, tgt: Optional[Tensor]) -> Tensor:
        """Adversarial: classified as the target when there is one to reach, else anything but y
        (FAB-T's targets only say which boundary to try)."""
        if tgt is not None and self.__dict__.get("_reach_target"):
            return z.argmax(1) == tgt
        return z.argmax(1) != y

    def _project_near_misses(self, R: Dict[str, Tensor], xn: Tensor, y: Tensor, eps: Tensor,
                             tgt: Optional[Tensor] = None) -> None:
        """An adversarial example found just outside the eps-ball (up to 1.5·eps) is projected
        onto the ball and kept if it still fools the model: one forward pass for those
        rows, never a loss of strength."""
        near = torch.isfinite(R["norm"]) & (R["norm"] > eps) & (R["norm"] <= 1.5 * eps)
        if not bool(near.any()):
            return
        rows = near.nonzero().squeeze(1)
        xa, x0, e = R["x"][rows], xn[rows], eps[rows]
        d = xa - x0
        if self.norm == "Linf":
            d = torch.maximum(torch.minimum(d, view_rows(e, d)), -view_rows(e, d))
        elif self.norm == "L2":
            d = d * view_rows((e / lp_norm(d, "L2").clamp_min(1e-12)).clamp(max=1.0), d)
        else:
            d = l1_project_delta(x0, d, e, self.lower, self.upper)
        xp = (x0 + d).clamp(self.lower, self.upper)
        with torch.no_grad():
            zp = self.logits(xp).float()
            fooled = self._fooled(zp, y[rows], None if tgt is None else tgt[rows]) & finite_rows(zp)
        dist = lp_norm(xp - x0, self.norm)
        ok = fooled & (dist <= e)
        if bool(ok.any()):
            keep = rows[ok]
            R["x"][keep] = xp[ok].to(R["x"].dtype)
            R["norm"][keep] = dist[ok]

    @staticmethod
    def _retire(W: Working, R: Dict[str, Tensor], rows: Tensor) -> None:
        if rows.numel() == 0:
            return
        ids = W.idx.index_select(0, rows)
        R["x"].index_copy_(0, ids, W.x_out.index_select(0, rows))
        R["norm"].index_copy_(0, ids, W.best.index_select(0, rows))
        R["steps"].index_copy_(0, ids, W.n_steps.index_select(0, rows))
        R["nonfinite"].index_copy_(0, ids, W.bad.index_select(0, rows))

    # ------------------------------------------------------------- layout
    def _target_table(self, z: Tensor, target: Optional[Tensor]) -> Optional[Tensor]:
        if target is not None:
            return target[:, None]
        if not self.multi_targeted:
            return None
        t = min(self.n_target_classes, z.shape[1] - 1)
        return z.argsort(1, descending=True)[:, 1:t + 1]

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        # misclassified, or classified as the target given; the returned point is within eps
        return self.is_success(z, y, target) & finite_rows(z)

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor],
                gen: torch.Generator) -> AttackResult:
        return self._run_points(x, y, target, gen, torch.full((x.shape[0],), self.eps, device=x.device))

    def _run_points(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator,
                    eps: Tensor) -> AttackResult:
        b = x.shape[0]
        dev = x.device
        with torch.no_grad():
            z = self.logits(x).float()
        self._n_cls = z.shape[1]
        tg = self._target_table(z, target)
        # a target given is the goal (success: the model says it); FAB-T's own targets are not
        self._reach_target = target is not None
        done = self.is_success(z, y, target)
        x_adv = x.clone()
        success = done.clone()
        min_norm = torch.where(done, torch.zeros(b, device=dev), torch.full((b,), math.inf, device=dev))
        steps = torch.zeros(b, dtype=torch.long, device=dev)
        nonfinite = torch.zeros(b, dtype=torch.bool, device=dev)
        todo = (~done).nonzero().squeeze(1)
        for E in entry_chunks(todo, x, y, tg, eps, self.n_restarts, self.max_rows):
            m, pts, xn, ye, ee = E.n_points, E.pts, E.x, E.y, E.eps
            R = self._optimize(xn, ye, E.target, ee, E.restart > 0, E.group, m, gen)
            self._project_near_misses(R, xn, ye, ee, E.target)
            ok = R["norm"] <= ee
            idx, gs = pick_per_group(E.group, m, ok, -R["norm"])
            xa = torch.where(view_rows(gs, xn[:m]), R["x"].index_select(0, idx), x.index_select(0, pts))
            x_adv.index_copy_(0, pts, xa)
            success.index_copy_(0, pts, gs)
            min_norm.index_copy_(0, pts, R["norm"].index_select(0, idx))
            steps.index_copy_(0, pts, E.per_point_sum(R["steps"]))
            nonfinite.index_copy_(0, pts, group_any(R["nonfinite"], E.group, m))
        if self.verbose:
            print(f"{self.attack}: robust accuracy {1 - success.float().mean().item():.2%} on {b} points")
        loss = -min_norm
        return AttackResult(x_adv, success, loss, steps, extra={"min_norm": min_norm, "norm": self.norm,
                                                                "nonfinite": nonfinite})


class FABT(FAB):
    """FAB-T: FAB targeted at each of the top ``n_target_classes`` classes (AutoAttack's fab-t)."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 verbose: bool = False, seed: Optional[int] = 0, n_classes: Optional[int] = None,
                 **kwargs):
        kwargs.setdefault("name", "FABT")
        super().__init__(model, norm, eps, steps, n_restarts, alpha_max, eta, beta, verbose, seed,
                         True, n_classes, **kwargs)
