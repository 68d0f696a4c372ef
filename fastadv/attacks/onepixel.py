"""The one-pixel attack (Su, Vargas, Sakurai 2019): differential evolution over the positions
and values of a few pixels, drop-in for ``torchattacks.OnePixel``.

torchattacks runs scipy's differential evolution once per image. Here one population per
point evolves for all points at once: each generation's trial vectors of every point are
built together and scored in one pass of ``[points × population]`` images (``inf_batch``
rows per forward), and a point leaves the batch as soon as one of its candidates fools
the model. The evolution is scipy's ``best1bin`` as torchattacks configures it: a random
initial population, ``popsize // len(x)`` members per parameter (at least 5), mutation
dithered in [0.5, 1) per generation, recombination 1 (the trial is the mutant), entries
leaving [0, 1) redrawn, a trial replacing its parent when it scores lower. All random
numbers come from the attack's generator.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._groups import Working, finite_rows, returned_nonfinite
from .base import Attack, AttackResult, int_arg

__all__ = ["OnePixel"]


class OnePixel(Attack):
    """One-pixel attack, torchattacks' arguments and defaults: ``pixels=1`` pixels changed,
    ``steps=10`` generations, ``popsize=10`` (scipy's population multiplier, divided by the
    parameters per candidate as torchattacks does), ``inf_batch=128`` images per forward.
    Needs image batches [B, C, H, W]; a candidate sets each of its pixels to values in
    [lower, upper] (every channel).

    Minimises the softmax probability of the label (targeted: 1 − that of the target).
    ``success``: misclassified (or the target); ``steps`` and ``extra["queries"]``: the
    images scored per point; ``loss``: −(that probability) at x_adv."""

    uses_gradients = False
    eps_ball = False

    def __init__(self, model, pixels: int = 1, steps: int = 10, popsize: int = 10, inf_batch: int = 128,
                 **kwargs):
        super().__init__(kwargs.pop("name", "OnePixel"), model, **kwargs)
        self.pixels = int_arg("pixels", pixels)
        self.steps = int_arg("steps", steps, 0)
        self.popsize = int_arg("popsize", popsize)
        self.inf_batch = int_arg("inf_batch", inf_batch)

    # ------------------------------------------------------------- scoring
    def _energy(self, xs: Tensor, y: Tensor, tgt: Optional[Tensor]):
        """(energy, fooled) of candidate images: the probability to lower, and success."""
        with torch.no_grad():
            z = torch.cat([self.logits(xs[i:i + self.inf_batch]).float()
                           for i in range(0, xs.shape[0], self.inf_batch)]) if xs.shape[0] else \
                self.logits(xs).float()
        lab = y if tgt is None else tgt
        p = z.softmax(1).gather(1, lab[:, None]).squeeze(1)
        energy = p if tgt is None else 1 - p
        ok = finite_rows(z)
        return energy.masked_fill(~ok, math.inf), self.is_success(z, y, tgt)

    def _images(self, x: Tensor, params: Tensor) -> Tensor:
        """Candidate images: ``x`` [m, C, H, W] with the pixels ``params`` [m, P, D] (unit
        cube coordinates) written in, as [m·P, C, H, W]."""
        m, c, h, w = x.shape
        pop = params.shape[1]
        out = x[:, None].expand(m, pop, c, h, w).reshape(m * pop, c, h * w).clone()
        q = params.reshape(m * pop, self.pixels, 2 + c)
        row = (q[..., 0] * h).long().clamp_(0, h - 1)        # int() of a value in [0, h)
        col = (q[..., 1] * w).long().clamp_(0, w - 1)
        vals = self.lower + q[..., 2:] * (self.upper - self.lower)   # [N, pixels, C]
        pos = row * w + col
        for k in range(self.pixels):   # one pixel at a time: a later one wins a shared position
            idx = pos[:, k, None, None].expand(-1, c, 1)
            out.scatter_(2, idx, vals[:, k, :, None])
        return out.reshape(m * pop, c, h, w)

    # ---------------------------------------------------------------- the run
    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator) -> AttackResult:
        if x.dim() != 4:
            raise ValueError(f"OnePixel: expected image batches [B, C, H, W], got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        dev = x.device
        d = self.pixels * (2 + c)
        pop = max(5, max(1, self.popsize // d) * d)
        z0 = self.clean_logits
        x_adv = x.clone()
        queries = torch.zeros(b, dtype=torch.long, device=dev)
        done = self.is_success(z0, y, target)
        lab = y if target is None else target
        p0 = z0.softmax(1).gather(1, lab[:, None]).squeeze(1)
        energy_out = p0 if target is None else 1 - p0
        W = Working(torch.arange(b, device=dev), x=x, y=y, tgt=target)
        W.compact(~done)

        def score(params):
            m = len(W)
            imgs = self._images(W.x, params)
            e, ok = self._energy(imgs, W.y.repeat_interleave(pop),
                                 None if W.tgt is None else W.tgt.repeat_interleave(pop))
            queries.index_add_(0, W.idx, torch.full((m,), pop, dtype=torch.long, device=dev))
            return imgs.reshape(m, pop, c, h, w), e.reshape(m, pop), ok.reshape(m, pop)

        def retire(imgs, energies, ok):
            """Points with a fooling candidate take the first one and leave the batch."""
            hit = ok.any(1)
            if bool(hit.any()):
                rows = hit.nonzero().squeeze(1)
                k = ok.float().argmax(1).index_select(0, rows)
                x_adv.index_copy_(0, W.idx.index_select(0, rows), imgs[rows, k])
                energy_out.index_copy_(0, W.idx.index_select(0, rows), energies[rows, k])
                done.index_copy_(0, W.idx.index_select(0, rows), torch.ones_like(k, dtype=torch.bool))
                W.compact(~hit)
            return hit

        if len(W):
            W.pop = torch.rand(len(W), pop, d, generator=gen, device=dev)
            imgs, W.energy, ok = score(W.pop)
            W.best = W.energy.argmin(1)
            retire(imgs, W.energy, ok)
        ar = torch.arange(pop, device=dev)
        for _ in range(self.steps):
            m = len(W)
            if m == 0:
                break
            f = 0.5 + 0.5 * torch.rand(m, 1, 1, generator=gen, device=dev)   # dithered mutation
            # two distinct members other than the candidate itself, for every candidate
            keys = torch.rand(m, pop, pop, generator=gen, device=dev).masked_fill_(ar[:, None] == ar, 2.0)
            r = keys.argsort(2)[..., :2]
            pick = W.pop[torch.arange(m, device=dev)[:, None, None], r]        # [m, pop, 2, d]
            best = W.pop.gather(1, W.best[:, None, None].expand(m, 1, d))
            trial = best + f * (pick[:, :, 0] - pick[:, :, 1])
            out = (trial < 0) | (trial > 1)
            trial = torch.where(out, torch.rand(trial.shape, generator=gen, device=dev), trial)
            imgs, e, ok = score(trial)
            better = e < W.energy
            W.pop = torch.where(better[..., None], trial, W.pop)
            W.energy = torch.where(better, e, W.energy)
            W.best = W.energy.argmin(1)
            retire(imgs, e, ok)
        if len(W):   # not fooled: the best member
            rows = torch.arange(len(W), device=dev)
            params = W.pop[rows, W.best][:, None]
            x_adv.index_copy_(0, W.idx, self._images(W.x, params))
            energy_out.index_copy_(0, W.idx, W.energy[rows, W.best])
        with torch.no_grad():
            z = self.exact_logits(x_adv, y)
        success = self.is_success(z, y, target)
        return AttackResult(x_adv, success, -energy_out.float(), queries.clone(),
                            extra={"queries": queries, **returned_nonfinite(z)})
