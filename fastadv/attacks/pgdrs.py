"""PGD against a randomized-smoothing classifier (SmoothAdv), L∞ (``PGDRS``) and L2
(``PGDRSL2``), drop-in for torchattacks' classes of the same names.

Each step attacks the smoothed soft classifier ``E_δ softmax(f(x' + δ))`` estimated with
``noise_batch_size`` noise draws per point: the loss is the NLL of the averaged softmax,
and the gradient flows through every noisy copy. The copies of a point are one batch
with the other points' (model passes never split a point's copies: the loss couples
them); the step is the fused ``linf_step_``/``l2_step_``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._catalogue import CatalogueAttack, Rows
from ._workers import split_count, split_rows
from .base import Attack, int_arg, module_of

__all__ = ["PGDRS", "PGDRSL2", "PGDL2RS"]

_NOISE_TYPES = ("guassian", "gaussian", "uniform")  # torchattacks spells its default "guassian"


class _SmoothedPGD(CatalogueAttack):
    """The shared loop: the iterate ``x'`` (kept in the ball and the box), the gradient of
    the smoothed NLL summed over the noisy copies of each point.

    Differences from torchattacks, where they show: the iterate is kept in the box at
    every step (torchattacks clamps only what the model sees, so a pixel pushed past 0 or 1
    gets no gradient and stays stuck there; for L2, the gradient's components that point out
    of the box at a pixel on its edge are dropped before the step is normalized, so the
    step's length goes to pixels that can move); ``success`` and ``loss`` judge the base
    classifier at the returned point (evaluate the smoothed one with
    ``fastadv.eval.smoothing``). The last iterate is returned: which iterate fools the
    smoothed classifier is only known up to its noise, so ``keep="best"``, early stop and
    restarts are not offered."""

    randomized = True

    def __init__(self, name, model, eps, alpha, steps, noise_type, noise_sd, noise_batch_size,
                 batch_max, **options):
        for k in ("keep", "early_stop", "restarts", "random_start"):
            if k in options:
                raise TypeError(f"{name}: unexpected keyword {k!r} (the last iterate is returned; "
                                f"see the class docstring)")
        if noise_type not in _NOISE_TYPES:
            raise ValueError(f"noise_type: expected 'guassian' (torchattacks' spelling), 'gaussian' "
                             f"or 'uniform', got {noise_type!r}")
        self.noise_type = noise_type
        self.noise_sd = Attack._nonneg("noise_sd", noise_sd)
        self.noise_batch_size = int_arg("noise_batch_size", noise_batch_size, 1)
        self.copies = self.noise_batch_size
        self.batch_max = int_arg("batch_max", batch_max, 1)
        self._mask_box = True
        super().__init__(name, model, eps, alpha, steps, False, keep="last", **options)

    def _repr_fields(self):
        return {"noise_type": self.noise_type, "noise_sd": self.noise_sd,
                "noise_batch_size": self.noise_batch_size}

    def _noise(self, shape, device) -> Tensor:
        """``noise_batch_size`` draws per point, point-major, drawn as torchattacks draws them."""
        flat = (shape[0], int(torch.Size(shape[1:]).numel()))
        if self.noise_type == "uniform":
            u = torch.rand(flat, generator=self._gen, device=device, dtype=torch.float32)
            return ((u - 0.5) * 2 * self.noise_sd).view(shape)
        return (torch.randn(flat, generator=self._gen, device=device, dtype=torch.float32)
                * self.noise_sd).view(shape)

    def _direction(self, rows: Rows, k: int, first):
        x, y, t = rows["x"], rows["y"], rows["t"]
        n, nb = x.shape[0], self.noise_batch_size
        xe = x.repeat_interleave(nb, 0)
        u = xe + self._noise(xe.shape, x.device).contiguous(memory_format=_format(x))
        g = self._smoothed_grad(u, y if t is None else t, t is not None)
        g = g.view((n, nb) + tuple(x.shape[1:])).sum(1).contiguous(memory_format=_format(x))
        if self.norm == "l2" and self._mask_box:
            # a pixel at the box's edge cannot move out: the L2 step's length goes to the
            # pixels that can move (torchattacks gets this from its clamp, which passes no
            # gradient to a pixel pushed past the edge, but there it also stops pixels that
            # would come back)
            g = torch.where(((x <= self.lower) & (g < 0)) | ((x >= self.upper) & (g > 0)), 0.0, g)
        return g, None

    def _smoothed_grad(self, u: Tensor, label: Tensor, targeted: bool) -> Tensor:
        """The input gradient, per noisy row, of the sum over points of the smoothed NLL
        (targeted: its negative towards ``label``). Pieces of whole points, at most
        ``_pass_rows`` and ``batch_max`` rows, on the CPU workers where they apply."""
        nb = self.noise_batch_size
        n = label.shape[0]
        rows = label.repeat_interleave(nb)

        def loss_fn(z: Tensor, lab: Tensor, _aux) -> Tensor:
            p = F.softmax(z.float(), dim=1)
            avg = p.view(-1, nb, p.shape[1]).mean(1)
            nll = F.nll_loss(torch.log(avg.clamp(min=1e-20)), lab[::nb], reduction="none")
            v = -nll if targeted else nll
            return v.repeat_interleave(nb) / nb   # sums to the points' total

        def piece(s: slice) -> Tensor:
            r = slice(s.start * nb, s.stop * nb)
            return self._loss_and_grad_once(u[r], rows[r], None, loss_fn, None)[2]

        per = max(1, min(self._pass_rows or n * nb, self.batch_max) // nb)
        module = module_of(self.model)
        out = []
        for s0 in range(0, n, per):
            s1 = min(n, s0 + per)
            k = split_count(u[s0 * nb:s1 * nb], module)
            k = min(k, s1 - s0)
            if k > 1:
                parts = split_rows(lambda s: piece(slice(s0 + s.start, s0 + s.stop)), s1 - s0, k)
                out.extend(parts)
            else:
                out.append(piece(slice(s0, s1)))
        return out[0] if len(out) == 1 else torch.cat(out)


def _format(t: Tensor):
    from ._engine import memory_format
    return memory_format(t)


class PGDRS(_SmoothedPGD):
    """L∞ PGD on a smoothed classifier (Salman et al. 2019, "Provably Robust Deep Learning
    via Adversarially Trained Smoothed Classifiers"), drop-in for
    ``torchattacks.PGDRS(model, eps=8/255, alpha=2/255, steps=10, noise_type="guassian",
    noise_sd=0.5, noise_batch_size=5, batch_max=2048)``."""

    norm = "linf"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, noise_type: str = "guassian", noise_sd: float = 0.5,
                 noise_batch_size: int = 5, batch_max: int = 2048, **options):
        super().__init__("PGDRS", model, eps, alpha, steps, noise_type, noise_sd,
                         noise_batch_size, batch_max, **options)


class PGDRSL2(_SmoothedPGD):
    """L2 PGD on a smoothed classifier (Salman et al. 2019, "Provably Robust Deep Learning
    via Adversarially Trained Smoothed Classifiers"), drop-in for
    ``torchattacks.PGDRSL2(model, eps=1.0, alpha=0.2, steps=10, noise_type="guassian",
    noise_sd=0.5, noise_batch_size=5, batch_max=2048, eps_for_division=1e-10)``. The step is
    the fused ``l2_step_`` (its gradient-norm floor is 1e-12; ``eps_for_division`` is
    accepted for compatibility)."""

    norm = "l2"

    def __init__(self, model: nn.Module, eps: float = 1.0, alpha: float = 0.2, steps: int = 10,
                 noise_type: str = "guassian", noise_sd: float = 0.5, noise_batch_size: int = 5,
                 batch_max: int = 2048, eps_for_division: float = 1e-10, **options):
        super().__init__("PGDRSL2", model, eps, alpha, steps, noise_type, noise_sd,
                         noise_batch_size, batch_max, **options)
        self.eps_for_division = self._nonneg("eps_for_division", eps_for_division)


PGDL2RS = PGDRSL2  # the name the L2 variant goes by in some write-ups
