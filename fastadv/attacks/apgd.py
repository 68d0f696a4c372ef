"""APGD and APGD-T (Croce & Hein 2020): PGD with momentum and a self-adapting step size.

Where the reference runs restarts and target classes one after another, and every
point for every step, fastadv lays restarts × targets out as one batch and drops
a point (all its rows) as soon as any row fools the model. The step-size
schedule (checkpoints, the two halving conditions, restart from the best point)
is per row and done with tensor ops: no host sync inside the loop except the
periodic compaction of the active set.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import losses as _losses
from ..ops import l2_project_, l2_step, linf_project_, linf_step_
from ._groups import (Working, channels_last, chunked_loss_and_grad, entry_chunks, finite_rows,
                      forward_rows, group_any, lp_norm, norm_name, pick_per_group, view_rows)
from .base import Attack, AttackResult, int_arg

__all__ = ["APGD", "APGDT", "apgd_checkpoints", "apgd_l1_checkpoints", "largereps_schedule",
           "step_size_reduction", "l1_project_delta"]


# ------------------------------------------------------------------ schedule
def apgd_checkpoints(steps: int) -> List[Tuple[int, int]]:
    """The step-size checkpoints of APGD (L∞/L2) for ``steps`` iterations.

    Returns ``[(t, k), ...]``: after ``t`` iterations the step size is checked and
    ``k`` iterations have passed since the previous check. The first window is
    ``0.22·steps`` long and each next one ``0.03·steps`` shorter, down to
    ``0.06·steps`` (Croce & Hein 2020, §3.2; the integer truncation of the
    reference code): for 100 steps, t = 22, 41, 57, 70, 80, 87, 93, 99."""
    if steps < 1:
        return []
    k = max(int(0.22 * steps), 1)
    dec = max(int(0.03 * steps), 1)
    kmin = max(int(0.06 * steps), 1)
    out, t = [], 0
    while t + k <= steps:
        t += k
        out.append((t, k))
        k = max(k - dec, kmin)
    return out


def apgd_l1_checkpoints(steps: int) -> List[Tuple[int, int]]:
    """L1-APGD (Croce & Hein 2021) checks every ``max(int(0.04·steps), 1)`` iterations."""
    k = max(int(0.04 * steps), 1)
    return [(t, k) for t in range(k, steps + 1, k)]


# (eps multiple, share of the steps) per stage of L1-APGD with use_largereps: the reference
# code's decr_eps_pgd (Croce & Hein 2021, "Mind the box", §3.3)
LARGEREPS_STAGES = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))


def largereps_schedule(steps: int) -> List[Tuple[float, int]]:
    """The stages of L1-APGD with ``use_largereps``: ``[(eps multiple, iterations), ...]``.

    ε is 3ε for ``ceil(0.3·steps)`` iterations, then 2ε for ``ceil(0.3·steps)``, then ε for
    the rest, as in the reference code (100 steps: 30 + 30 + 40). Below 4 steps the
    reference runs more iterations than asked; here the stages are cut so that they add
    up to ``steps`` (1 step: 1 + 0 + 0)."""
    out, used = [], 0
    last = len(LARGEREPS_STAGES) - 1
    for k, (factor, share) in enumerate(LARGEREPS_STAGES):
        n = steps - used if k == last else min(math.ceil(share * steps), steps - used)
        out.append((factor, n))
        used += n
    return out


# ---------------------------------------------------------------- L1 geometry
def l1_project_delta(x_nat: Tensor, delta: Tensor, eps: Tensor, lower: float, upper: float,
                     iters: int = 32) -> Tensor:
    """Euclidean projection of ``delta`` onto {d : ‖d‖₁ ≤ eps, lower ≤ x_nat + d ≤ upper}, per row.

    The solution is sign(δ)·min(max(|δ| − λ, 0), room) with room the distance to the
    box in the direction of δ; λ ≥ 0 is found by bisection (``iters`` halvings of
    [0, max|δ|], then the feasible end is taken, so ‖d‖₁ ≤ eps holds)."""
    shape = delta.shape
    u = delta.reshape(shape[0], -1).float()
    xf = x_nat.reshape(shape[0], -1).float()
    room = torch.where(u > 0, upper - xf, xf - lower).clamp_min(0.0)
    a = u.abs()
    e = eps.reshape(-1).float()
    boxed = torch.minimum(a, room)
    need = boxed.sum(1) > e
    lo = torch.zeros_like(e)
    hi = a.amax(1) if a.shape[1] else torch.zeros_like(e)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        s = (a - mid[:, None]).clamp_min(0.0).minimum(room).sum(1)
        over = s > e
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    lam = torch.where(need, hi, torch.zeros_like(hi))
    d = torch.sign(u) * (a - lam[:, None]).clamp_min(0.0).minimum(room)
    return d.reshape(shape).to(delta.dtype)


def step_size_reduction(n_incr: Tensor, k: int, rho: float, reduced_last: Tensor,
                        loss_best_last: Tensor, loss_best: Tensor) -> Tensor:
    """Which rows halve their step size at a checkpoint (Croce & Hein 2020, §3.2):

    (1) the loss rose in at most ρ·k of the k steps since the previous checkpoint
        (``n_incr`` of them), or
    (2) the step size was not halved at the previous checkpoint and the best loss has
        not improved since (``loss_best_last >= loss_best``).

    "At most" (≤) as in the reference code; the paper writes "<"."""
    return (n_incr.float() <= k * rho) | (~reduced_last & (loss_best_last >= loss_best))


def _l0(d: Tensor) -> Tensor:
    return (d.reshape(d.shape[0], -1) != 0).sum(1).float()


def untargeted_success(z: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    """Misclassified: what counts as fooled in AutoAttack, targeted attacks included (never on
    logits that are not finite)."""
    return (z.argmax(1) != y) & finite_rows(z)


LossFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


# ---------------------------------------------------------------------- APGD
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020) with restarts batched and an early-stopping active set.

    Defaults are torchattacks' (``steps=10``; AutoAttack runs it with the reference's 100)
    and the reference's: ρ = 0.75, momentum 0.75, initial step 2ε (L∞/L2) or ε with
    adaptive sparsity (L1). ``loss``: "ce", "dlr" or "cw". ``eot_iter`` averages the
    loss, logits and gradient of that many passes per step (EOT, for a randomised model);
    then every point runs all its steps and the result is its highest-loss iterate when
    that is adversarial on average.
    The reference's attribute names work too: ``n_iter`` is ``steps``, ``thr_decr`` is ``rho``.
    ``early_stop`` drops a point once fooled (the robust accuracy is unchanged; the
    loss of fooled points is that of their first adversarial iterate);
    ``max_rows`` caps the rows (points × restarts) of one batch;
    ``compact_every`` is how often (in iterations) fooled rows leave the batch:
    a host sync each time (default 1 on CPU, 10 on CUDA).
    """

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: Optional[int] = 0, loss: str = "ce", eot_iter: int = 1,
                 rho: float = 0.75, verbose: bool = False, *, early_stop: bool = True,
                 max_rows: Optional[int] = None, compact_every: Optional[int] = None,
                 use_largereps: bool = False, **kwargs):
        super().__init__(kwargs.pop("name", "APGD"), model, eps=eps, loss=loss, seed=seed, **kwargs)
        self.norm = norm_name(norm)
        if not isinstance(use_largereps, bool):
            raise TypeError(f"use_largereps: expected a bool, got {type(use_largereps).__name__}")
        if use_largereps and self.norm != "L1":
            raise ValueError(f"use_largereps: only for norm 'L1' (the eps schedule of L1-APGD), "
                             f"got norm {self.norm!r}")
        self.use_largereps = use_largereps
        self.steps = int_arg("steps", steps, 0)
        self.n_restarts = int_arg("n_restarts", n_restarts)
        self.eot_iter = int_arg("eot_iter", eot_iter)
        rho = self._real("rho", rho)
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho: expected a value in (0, 1], got {rho}")
        self.rho = rho
        self.verbose = self._flag("verbose", verbose)
        self.early_stop = self._flag("early_stop", early_stop)
        self.max_rows = None if max_rows is None else int_arg("max_rows", max_rows)
        self.compact_every = None if compact_every is None else int_arg("compact_every", compact_every)

    # the reference's names (fra31/auto-attack's APGDAttack), e.g. ``adversary.apgd.n_iter = 20``
    @property
    def n_iter(self) -> int:
        return self.steps

    @n_iter.setter
    def n_iter(self, v) -> None:
        self.steps = int_arg("n_iter", v, 0)

    @property
    def thr_decr(self) -> float:
        return self.rho

    @thr_decr.setter
    def thr_decr(self, v) -> None:
        v = self._real("thr_decr", v)
        if not 0.0 < v <= 1.0:
            raise ValueError(f"thr_decr: expected a value in (0, 1], got {v}")
        self.rho = v

    # ------------------------------------------------------------ pieces
    def _every(self, device: torch.device) -> int:
        if self.compact_every is not None:
            return self.compact_every
        return 10 if device.type == "cuda" else 1

    def _loss_grad(self, x: Tensor, y: Tensor, tgt: Optional[Tensor], loss_fn: LossFn):
        rows = self.__dict__.get("_rows")
        if self.__dict__.get("_cl"):
            x = channels_last(x)
        if self.eot_iter == 1:
            loss, z, g = chunked_loss_and_grad(self, x, y, tgt, loss_fn, rows)
        else:
            loss = z = g = None
            for _ in range(self.eot_iter):  # expectation over the model's randomness
                l_, z_, g_ = chunked_loss_and_grad(self, x, y, tgt, loss_fn, rows)
                loss, z, g = (l_, z_, g_) if loss is None else (loss + l_, z + z_, g + g_)
            k = float(self.eot_iter)
            loss, z, g = loss / k, z / k, g / k
        # the loss of non-finite logits is NaN: as -inf it is never a best point nor a rise
        return torch.nan_to_num(loss, nan=-math.inf), z, g

    def _random_start(self, xn: Tensor, eps: Tensor, gen: torch.Generator) -> Tensor:
        e = view_rows(eps, xn)
        if self.norm == "Linf":
            t = torch.empty_like(xn).uniform_(-1.0, 1.0, generator=gen)
            x = xn + e * t / view_rows(lp_norm(t, "Linf").clamp_min(1e-12), xn)
        elif self.norm == "L2":
            t = torch.empty_like(xn).normal_(generator=gen)
            x = xn + e * t / view_rows(lp_norm(t, "L2").clamp_min(1e-12), xn)
        else:
            t = torch.empty_like(xn).normal_(generator=gen)
            x = xn + l1_project_delta(xn, t, eps, self.lower, self.upper)
        return x.clamp_(self.lower, self.upper)

    def _step(self, W: Working, a: float, n_fts: int) -> Tensor:
        lo, hi = self.lower, self.upper
        if self.norm == "L1":
            g = W.grad.reshape(len(W), -1)
            ag = g.abs()
            k = ((1.0 - W.topk) * n_fts).clamp(0, n_fts - 1).long()
            thr = ag.sort(1).values.gather(1, k[:, None])
            sg = torch.sign(g) * (ag >= thr)
            sg = sg / (sg.abs().sum(1, keepdim=True) + 1e-10)
            x1 = W.x + view_rows(W.step, W.x) * sg.reshape(W.x.shape)
            return W.xn + l1_project_delta(W.xn, x1 - W.xn, W.eps, lo, hi)
        if self.norm == "Linf":
            z = W.x.clone()
            linf_step_(z, W.xn, W.grad, W.step, W.eps, lo, hi, _check_values=False)
        else:
            z = l2_step(W.x, W.xn, W.grad, W.step, W.eps, lo, hi, _check_values=False)
        if a == 1.0:
            return z
        # x + a·(z − x) + (1 − a)·(x − x_old) = a·z + 2(1 − a)·x − (1 − a)·x_old, projected back
        z.mul_(a).add_(W.x, alpha=2.0 * (1.0 - a)).sub_(W.x_old, alpha=1.0 - a)
        if self.norm == "Linf":
            linf_project_(z, W.xn, W.eps, lo, hi, _check_values=False)
        else:
            l2_project_(z, W.xn, W.eps, lo, hi, _check_values=False)
        return z

    # ----------------------------------------------------------- the core
    def _optimize(self, xn: Tensor, y: Tensor, tgt: Optional[Tensor], eps: Tensor, group: Tensor,
                  n_groups: int, gen: torch.Generator, loss_fn: LossFn,
                  success_fn: Callable = untargeted_success) -> Dict[str, Tensor]:
        """Run APGD on every entry (row) of ``xn`` at once; entries of a group stop together.

        Returns per entry: x (first adversarial iterate if fooled, else the highest-loss
        one), success, loss (at x), steps (iterations run)."""
        self._cl = self._use_channels_last(xn)
        if self._cl:
            xn = channels_last(xn)
        n = xn.shape[0]
        dev = xn.device
        alpha = 1.0 if self.norm == "L1" else 2.0
        n_fts = xn[0].numel() if n else 1
        stages = largereps_schedule(self.steps) if self.use_largereps else [(1.0, self.steps)]
        x_start = self._random_start(xn, eps * stages[0][0], gen)
        self._rows = forward_rows(self, xn, y, tgt) if self.max_rows is None else self.max_rows
        # eps: the ball of the current stage; eps_goal: the one a success must lie in
        W = Working(torch.arange(n, device=dev), xn=xn, y=y, tgt=tgt, eps=eps, eps_goal=eps,
                    group=group, fooled=torch.zeros(n, dtype=torch.bool, device=dev),
                    x_fool=x_start.clone(), loss_fool=torch.zeros(n, device=dev),
                    n_steps=torch.zeros(n, dtype=torch.long, device=dev),
                    bad=torch.zeros(n, dtype=torch.bool, device=dev))
        R = {"x": xn.clone(), "success": torch.zeros(n, dtype=torch.bool, device=dev),
             "loss": torch.zeros(n, device=dev), "steps": torch.zeros(n, dtype=torch.long, device=dev),
             "step_size": torch.zeros(n, device=dev), "nonfinite": torch.zeros(n, dtype=torch.bool, device=dev)}
        every = self._every(dev)
        for s, (factor, iters) in enumerate(stages):
            if len(W) == 0:
                break
            if iters == 0 and s + 1 < len(stages):
                continue
            if self.use_largereps:
                W.eps = W.eps_goal * factor
                x_start = W.xn + l1_project_delta(W.xn, x_start - W.xn, W.eps, self.lower, self.upper)
            self._start_stage(W, x_start, alpha, n_fts, loss_fn, success_fn, factor > 1.0)
            if self._stops_early() and len(W):
                self._compact(W, R, n_groups, force=True)
            self._run_stage(W, R, iters, alpha, n_fts, n_groups, every, loss_fn, success_fn,
                            factor > 1.0)
            x_start = W.x_best
        self._retire(W, R, torch.arange(len(W), device=dev))
        return R

    def _succeeded(self, W: Working, x: Tensor, z: Tensor, success_fn: Callable, wide: bool) -> Tensor:
        succ = success_fn(z, W.y, W.tgt)
        if wide:  # a stage in a larger ball: only a point within eps_goal counts
            succ = succ & (lp_norm(x - W.xn, self.norm) <= W.eps_goal)
        return succ

    def _start_stage(self, W: Working, x0: Tensor, alpha: float, n_fts: int, loss_fn: LossFn,
                     success_fn: Callable, wide: bool) -> None:
        """A fresh APGD state at ``x0`` for every row (step size, sparsity, best point)."""
        n = len(W)
        dev = x0.device
        loss, z, grad = self._loss_grad(x0, W.y, W.tgt, loss_fn)
        W.bad = W.bad | ~finite_rows(z)
        succ = self._succeeded(W, x0, z, success_fn, wide)
        newly = succ & ~W.fooled
        W.x_fool = torch.where(view_rows(newly, x0), x0, W.x_fool)
        W.loss_fool = torch.where(newly, loss, W.loss_fool)
        W.fooled = W.fooled | succ
        W.x, W.x_old, W.grad = x0, x0, grad
        W.x_best, W.grad_best = x0.clone(), grad.clone()
        W.succ_best = succ.clone()  # success (of the averaged logits) at x_best
        W.loss_best, W.loss_prev, W.loss_last = loss.clone(), loss, loss.clone()
        W.reduced = torch.ones(n, dtype=torch.bool, device=dev)
        W.n_incr = torch.zeros(n, dtype=torch.int32, device=dev)
        W.step = alpha * W.eps
        if self.norm == "L1":
            if self.use_largereps:
                # a given start: the sparsity follows its support (the reference's x_init case)
                sp = _l0(x0 - W.xn)
                W.topk = sp / n_fts / 1.5
                W.sp_old = sp
            else:
                W.topk = torch.full((n,), 0.2, device=dev)
                W.sp_old = torch.full((n,), float(n_fts), device=dev)

    def _run_stage(self, W: Working, R: Dict[str, Tensor], iters: int, alpha: float, n_fts: int,
                   n_groups: int, every: int, loss_fn: LossFn, success_fn: Callable,
                   wide: bool) -> None:
        checks = dict(apgd_l1_checkpoints(iters) if self.norm == "L1" else apgd_checkpoints(iters))
        for i in range(iters):
            if len(W) == 0:
                break
            a = 0.75 if i > 0 else 1.0
            x_new = self._step(W, a, n_fts)
            loss, z, grad = self._loss_grad(x_new, W.y, W.tgt, loss_fn)
            W.bad = W.bad | ~finite_rows(z)
            succ = self._succeeded(W, x_new, z, success_fn, wide)
            active = ~W.fooled
            W.n_steps += 1  # work done: the row was in the batch
            newly = succ & active
            torch.where(view_rows(newly, x_new), x_new, W.x_fool, out=W.x_fool)
            W.loss_fool = torch.where(newly, loss, W.loss_fool)
            W.fooled = W.fooled | succ
            W.n_incr += (loss > W.loss_prev).to(torch.int32)
            W.loss_prev = loss
            better = loss > W.loss_best
            vb = view_rows(better, x_new)
            torch.where(vb, x_new, W.x_best, out=W.x_best)
            torch.where(vb, grad, W.grad_best, out=W.grad_best)
            W.loss_best = torch.where(better, loss, W.loss_best)
            W.succ_best = torch.where(better, succ, W.succ_best)
            W.x_old, W.x, W.grad = W.x, x_new, grad
            if i + 1 in checks:
                self._checkpoint(W, checks[i + 1], alpha, n_fts)
            if self._stops_early() and (i + 1) % every == 0 and i + 1 < iters:
                self._compact(W, R, n_groups)

    def _checkpoint(self, W: Working, k: int, alpha: float, n_fts: int) -> None:
        if self.norm == "L1":
            sp = _l0(W.x_best - W.xn)
            fl = sp / W.sp_old.clamp_min(1.0) < 0.95
            W.topk = sp / n_fts / 1.5
            top = alpha * W.eps
            W.step = torch.where(fl, top, W.step / 1.5)
            W.step = torch.minimum(torch.maximum(W.step, top / 10.0), top)
            W.sp_old = sp
        else:
            # (1) the loss rose in at most ρ·k of the last k steps, or (2) the step was not
            # halved at the previous check and the best loss has not improved since
            fl = step_size_reduction(W.n_incr, k, self.rho, W.reduced, W.loss_last, W.loss_best)
            W.reduced = fl
            W.loss_last = W.loss_best.clone()
            W.n_incr = torch.zeros_like(W.n_incr)
            W.step = torch.where(fl, W.step * 0.5, W.step)
        vf = view_rows(fl, W.x)
        W.x = torch.where(vf, W.x_best, W.x)
        W.grad = torch.where(vf, W.grad_best, W.grad)

    def _retire(self, W: Working, R: Dict[str, Tensor], rows: Tensor) -> None:
        if rows.numel() == 0:
            return
        ids = W.idx.index_select(0, rows)
        fo = W.fooled.index_select(0, rows)
        xf = W.x_fool.index_select(0, rows)
        xb = W.x_best.index_select(0, rows)
        # the first adversarial iterate; under EOT the highest-loss one when it is adversarial
        # too (a randomised model's first success is often a lucky draw)
        first = fo if self.eot_iter == 1 else fo & ~W.succ_best.index_select(0, rows)
        R["x"].index_copy_(0, ids, torch.where(view_rows(first, xf), xf, xb))
        R["success"].index_copy_(0, ids, fo)
        R["loss"].index_copy_(0, ids, torch.where(first, W.loss_fool.index_select(0, rows),
                                                  W.loss_best.index_select(0, rows)))
        R["steps"].index_copy_(0, ids, W.n_steps.index_select(0, rows))
        R["step_size"].index_copy_(0, ids, W.step.index_select(0, rows))
        R["nonfinite"].index_copy_(0, ids, W.bad.index_select(0, rows))

    def _stops_early(self) -> bool:
        """Fooled points leave the batch, except under EOT: a randomised model's success is
        itself random, and the steps after it make it hold for more draws."""
        return self.early_stop and self.eot_iter == 1

    def _compact(self, W: Working, R: Dict[str, Tensor], n_groups: int, force: bool = False) -> None:
        keep = ~group_any(W.fooled, W.group, n_groups)[W.group]
        n_drop = len(W) - int(keep.sum())
        # copying the state costs a few elementwise passes: only worth it for enough rows
        if n_drop == 0 or (not force and n_drop * 16 < len(W)):
            return
        self._retire(W, R, (~keep).nonzero().squeeze(1))
        W.compact(keep)

    # ------------------------------------------------------- entry layout
    def _targets_and_loss(self, z: Tensor, y: Tensor, target: Optional[Tensor]):
        """(targets per point [B, T] or None, loss_fn, success_fn)."""
        if target is not None:
            return target[:, None], self.attack_loss, Attack.is_success
        return None, self.attack_loss, untargeted_success

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor],
                gen: torch.Generator) -> AttackResult:
        return self._run_points(x, y, target, gen, torch.full((x.shape[0],), self.eps, device=x.device))

    def _run_points(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator,
                    eps: Tensor) -> AttackResult:
        b = x.shape[0]
        dev = x.device
        with torch.no_grad():
            z = self.logits(x).float()
        tg, loss_fn, success_fn = self._targets_and_loss(z, y, target)
        done = success_fn(z, y, target)
        x_adv = x.clone()
        success = done.clone()
        loss = loss_fn(z, y, None if tg is None else tg[:, 0])
        steps = torch.zeros(b, dtype=torch.long, device=dev)
        step_size = torch.zeros(b, device=dev)
        nonfinite = torch.zeros(b, dtype=torch.bool, device=dev)
        todo = (~done).nonzero().squeeze(1)
        for E in entry_chunks(todo, x, y, tg, eps, self.n_restarts, self.max_rows):
            m, pts = E.n_points, E.pts
            R = self._optimize(E.x, E.y, E.target, E.eps, E.group, m, gen, loss_fn, success_fn)
            idx, gs = pick_per_group(E.group, m, R["success"], R["loss"])
            # a point with no finite logits anywhere (loss -inf) keeps its clean point
            found = gs | (R["loss"].index_select(0, idx) > -math.inf)
            x_adv.index_copy_(0, pts, torch.where(view_rows(found, x), R["x"].index_select(0, idx),
                                                  x.index_select(0, pts)))
            success.index_copy_(0, pts, gs)
            loss.index_copy_(0, pts, torch.where(found, R["loss"].index_select(0, idx), loss.index_select(0, pts)))
            nonfinite.index_copy_(0, pts, group_any(R["nonfinite"], E.group, m))
            steps.index_copy_(0, pts, E.per_point_sum(R["steps"]))
            step_size.index_copy_(0, pts, R["step_size"].index_select(0, idx))
        if self.verbose:
            print(f"{self.attack}: robust accuracy {1 - success.float().mean().item():.2%} "
                  f"on {b} points ({int(steps.sum())} row-steps)")
        # step_size: the final step size of the row each point's result came from
        return AttackResult(x_adv, success, loss, steps, extra={"norm": self.norm, "step_size": step_size,
                                                                "nonfinite": nonfinite})


class APGDT(APGD):
    """APGD-T: targeted DLR against the top ``n_target_classes`` other classes, all at once.

    Each point runs one APGD per target class (the classes ranked 2nd, 3rd, ... by the
    clean logits) and restart, batched together; a point counts as fooled when it
    is misclassified (any class), as in AutoAttack. ``n_classes`` is torchattacks'
    argument: without ``n_target_classes`` it targets ``n_classes - 1`` classes, as
    torchattacks does (9 when neither is given; the model's output decides the class
    count, and a value that differs warns). ``loss`` may be spelled as in the reference
    (``"dlr-targeted"``, ``"ce-targeted"``)."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: Optional[int] = 0, eot_iter: int = 1, rho: float = 0.75,
                 verbose: bool = False, n_classes: Optional[int] = None, *,
                 n_target_classes: Optional[int] = None, loss: str = "dlr", **kwargs):
        loss = _TARGETED_LOSSES.get(loss, loss)
        if loss not in ("dlr", "ce"):
            raise ValueError(f"loss: expected 'dlr' (targeted DLR) or 'ce' (targeted CE), got {loss!r}")
        super().__init__(model, norm, eps, steps, n_restarts, seed, loss, eot_iter, rho, verbose,
                         name="APGDT", **kwargs)
        if n_classes is not None:
            int_arg("n_classes", n_classes, 2)
        self.n_classes = n_classes
        if n_target_classes is None:  # torchattacks: every class but the true one
            n_target_classes = 9 if n_classes is None else n_classes - 1
        self.n_target_classes = int_arg("n_target_classes", n_target_classes)

    def _targets_and_loss(self, z: Tensor, y: Tensor, target: Optional[Tensor]):
        n_cls = z.shape[1]
        loss = _TARGETED_LOSSES.get(self.loss, self.loss)  # may be set after construction
        if loss not in ("dlr", "ce"):
            raise ValueError(f"loss: expected 'dlr' (targeted DLR) or 'ce' (targeted CE), got {self.loss!r}")
        if loss == "dlr" and n_cls < 4:
            raise ValueError(f"APGDT: the targeted DLR loss needs at least 4 classes, the model has "
                             f"{n_cls} (use loss='ce')")
        loss_fn = _targeted_dlr if loss == "dlr" else _targeted_ce
        if target is not None:
            return target[:, None], loss_fn, Attack.is_success
        t = min(self.n_target_classes, n_cls - 1)
        return z.argsort(1, descending=True)[:, 1:t + 1], loss_fn, untargeted_success


# the reference's spellings of APGDAttack_targeted's losses
_TARGETED_LOSSES = {"dlr-targeted": "dlr", "ce-targeted": "ce"}


def _targeted_dlr(z: Tensor, y: Tensor, t: Optional[Tensor]) -> Tensor:
    return _losses.dlr_loss_targeted(z, y, t)


def _targeted_ce(z: Tensor, y: Tensor, t: Optional[Tensor]) -> Tensor:
    return -_losses.cross_entropy(z, t)


