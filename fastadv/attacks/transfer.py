"""Transfer attacks of torchattacks' catalogue: MI-, NI-, SI-NI-, VMI-, VNI-, DI²- and
TI-FGSM, drop-in for torchattacks' classes of the same names.

All are L∞ sign-step attacks with momentum on mean-|g|-scaled gradients, made to craft
examples on a surrogate that fool other models. They run on PGD's engine (fused
``linf_step_``, input-only gradients, amp, the model given back as found) with the
several passes a step needs — SI's scale copies, VMI/VNI's neighbours — as one batch.

By default they return the last iterate (``keep="last"``), as torchattacks does: the
first iterate that fools the surrogate transfers worse than the last, so neither the
best-iterate choice nor early stop is on by default (``keep="best"``, ``early_stop=True``
turn them on for white-box use). Constructor names, order and defaults are torchattacks
3.5.1's; fastadv's options are keywords.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._catalogue import CatalogueAttack, Rows, decay_arg, mean_abs_normalized
from .base import Attack, int_arg

__all__ = ["MIFGSM", "NIFGSM", "SINIFGSM", "VMIFGSM", "VNIFGSM", "DIFGSM", "TIFGSM"]


class _Momentum(CatalogueAttack):
    """The shared momentum update: ``m = decay·m + g / mean(|g|)``, step along ``sign(m)``."""

    nesterov = False

    def __init__(self, name: str, model, eps, alpha, steps, decay, random_start=False, **options):
        options.setdefault("keep", "last")
        self.decay = decay_arg(decay)
        super().__init__(name, model, eps, alpha, steps, random_start, **options)

    def _repr_fields(self):
        return {"decay": self.decay}

    def _init_state(self, rows: Rows, samples: int) -> None:
        rows["m"] = torch.zeros_like(rows["x"])

    def _lookahead(self, rows: Rows) -> Tensor:
        """Where the gradient is taken: x, or NI's x + decay·alpha·m."""
        if not self.nesterov:
            return rows["x"]
        return rows["x"] + self.decay * self.alpha * rows["m"]

    def _accumulate(self, rows: Rows, g: Tensor) -> Tensor:
        m = rows["m"]
        m.mul_(self.decay).add_(mean_abs_normalized(g))
        return m


class MIFGSM(_Momentum):
    """MI-FGSM (Dong et al. 2018, "Boosting Adversarial Attacks with Momentum"), drop-in for
    ``torchattacks.MIFGSM(model, eps=8/255, alpha=2/255, steps=10, decay=1.0)``."""

    plain_first_pass = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, decay: float = 1.0, **options):
        super().__init__("MIFGSM", model, eps, alpha, steps, decay, **options)

    def _direction(self, rows: Rows, k: int, first):
        _, z, g = first if first is not None else self._pass(rows["x"], rows["y"], rows["t"])
        return self._accumulate(rows, g), z


class NIFGSM(_Momentum):
    """NI-FGSM (Lin et al. 2020, "Nesterov Accelerated Gradient and Scale Invariance for
    Adversarial Attacks"), drop-in for ``torchattacks.NIFGSM(model, eps=8/255,
    alpha=2/255, steps=10, decay=1.0)``: MI-FGSM with the gradient taken at the look-ahead
    point ``x + decay·alpha·m``. (With ``keep="best"`` each step also needs the logits at
    x itself: one forward more.)"""

    plain_first_pass = True  # at step 0 the look-ahead point is x
    nesterov = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, decay: float = 1.0, **options):
        super().__init__("NIFGSM", model, eps, alpha, steps, decay, **options)

    def _direction(self, rows: Rows, k: int, first):
        if first is not None:
            _, z, g = first
        else:
            _, z, g = self._pass(self._lookahead(rows), rows["y"], rows["t"])
            if k > 0:
                z = None     # logits at the look-ahead point, not at x
        return self._accumulate(rows, g), z


class SINIFGSM(_Momentum):
    """SI-NI-FGSM (Lin et al. 2020, "Nesterov Accelerated Gradient and Scale Invariance for
    Adversarial Attacks"), drop-in for ``torchattacks.SINIFGSM(model, eps=8/255,
    alpha=2/255, steps=10, decay=1.0, m=5)``: NI-FGSM on the mean gradient over the ``m``
    scale copies ``x_nes / 2^i``, passed as one batch of ``m·B`` rows."""

    nesterov = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, decay: float = 1.0, m: int = 5, **options):
        self.m = int_arg("m", m, 1)
        self.copies = self.m
        super().__init__("SINIFGSM", model, eps, alpha, steps, decay, **options)

    def _repr_fields(self):
        return {"decay": self.decay, "m": self.m}

    def _direction(self, rows: Rows, k: int, first):
        x_nes = self._lookahead(rows)
        n = x_nes.shape[0]
        u = torch.cat([x_nes / float(2 ** i) for i in range(self.m)])
        _, z, gu = self._copies_pass(u, self.m, rows["y"], rows["t"])
        g = torch.zeros_like(x_nes)
        for i in range(self.m):   # d(x_nes / 2^i)/dx = 1 / 2^i, summed in torchattacks' order
            g += gu[i * n:(i + 1) * n] / float(2 ** i)
        g = g / self.m
        return self._accumulate(rows, g), (z[:n] if k == 0 else None)


class _Variance(_Momentum):
    """VMI/VNI-FGSM: the gradient corrected by the variance term ``v`` of the previous step,
    ``v = mean(gradients at N points uniform in the (beta·eps)-box around x) - gradient``."""

    randomized = True   # the neighbours differ between restarts
    plain_first_pass = True

    def __init__(self, name, model, eps, alpha, steps, decay, N, beta, **options):
        self.N = int_arg("N", N, 1)
        self.copies = self.N + 1
        self.beta = Attack._nonneg("beta", beta)
        super().__init__(name, model, eps, alpha, steps, decay, **options)

    def _repr_fields(self):
        return {"decay": self.decay, "N": self.N, "beta": self.beta}

    def _init_state(self, rows: Rows, samples: int) -> None:
        rows["m"] = torch.zeros_like(rows["x"])
        rows["v"] = torch.zeros_like(rows["x"])

    def _direction(self, rows: Rows, k: int, first):
        x, y, t = rows["x"], rows["y"], rows["t"]
        n, r = x.shape[0], self.eps * self.beta
        pts = [] if first is not None else [self._lookahead(rows)]
        for _ in range(self.N):
            # torchattacks draws a normal tensor and overwrites it with U(-r, r): the same
            # draws, so that a seed reproduces its neighbours
            u = torch.randn(x.shape, generator=self._gen, device=x.device, dtype=torch.float32)
            u.uniform_(-r, r, generator=self._gen)
            pts.append(x + u.contiguous(memory_format=_engine_format(x)))
        _, zs, gs = self._copies_pass(torch.cat(pts), len(pts), y, t)
        if first is not None:
            _, z, g = first
        else:
            z, g, gs = zs[:n], gs[:n], gs[n:]
        gv = torch.zeros_like(x)
        for j in range(self.N):
            gv += gs[j * n:(j + 1) * n]
        gc = g + rows["v"]
        m = rows["m"]
        m.mul_(self.decay).add_(mean_abs_normalized(gc))
        rows["v"] = gv / self.N - g
        at_x = k == 0 or not self.nesterov
        return m, (z if at_x else None)


def _engine_format(t: Tensor):
    from ._engine import memory_format
    return memory_format(t)


class VMIFGSM(_Variance):
    """VMI-FGSM (Wang & He 2021, "Enhancing the Transferability of Adversarial Attacks
    through Variance Tuning"), drop-in for ``torchattacks.VMIFGSM(model, eps=8/255,
    alpha=2/255, steps=10, decay=1.0, N=5, beta=3/2)``. The gradient at x and at the ``N``
    neighbours is one batch of ``(N+1)·B`` rows; ``restarts`` run as one batch too."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, decay: float = 1.0, N: int = 5, beta: float = 3 / 2, **options):
        super().__init__("VMIFGSM", model, eps, alpha, steps, decay, N, beta, **options)


class VNIFGSM(_Variance):
    """VNI-FGSM (Wang & He 2021, "Enhancing the Transferability of Adversarial Attacks
    through Variance Tuning"), drop-in for ``torchattacks.VNIFGSM(model, eps=8/255,
    alpha=2/255, steps=10, decay=1.0, N=5, beta=3/2)``: VMI-FGSM with the gradient taken at
    NI's look-ahead point (the neighbours stay around x)."""

    nesterov = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, decay: float = 1.0, N: int = 5, beta: float = 3 / 2, **options):
        super().__init__("VNIFGSM", model, eps, alpha, steps, decay, N, beta, **options)


class DIFGSM(_Momentum):
    """DI²-FGSM (Xie et al. 2019, "Improving Transferability of Adversarial Examples with
    Input Diversity"), drop-in for ``torchattacks.DIFGSM(model, eps=8/255, alpha=2/255,
    steps=10, decay=0.0, resize_rate=0.9, diversity_prob=0.5, random_start=False)``.

    With probability ``diversity_prob`` a step's gradient is taken through a random resize
    (to ``rnd×rnd``, ``rnd`` between ``resize_rate·W`` and ``W``) and a random zero pad back,
    one draw per step for the batch, as in torchattacks (images [B, C, H, W]; the size is
    read from the width). ``restarts`` need ``random_start=True``."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, decay: float = 0.0, resize_rate: float = 0.9,
                 diversity_prob: float = 0.5, random_start: bool = False, **options):
        self._set_diversity(resize_rate, diversity_prob)
        super().__init__("DIFGSM", model, eps, alpha, steps, decay, random_start, **options)

    def _name(self) -> str:
        return type(self).__name__

    def _set_diversity(self, resize_rate, diversity_prob) -> None:
        self.resize_rate = Attack._nonneg("resize_rate", resize_rate)
        if self.resize_rate <= 0:
            raise ValueError(f"resize_rate: expected a number > 0, got {resize_rate}")
        self.diversity_prob = Attack._nonneg("diversity_prob", diversity_prob)
        if self.diversity_prob > 1:
            raise ValueError(f"diversity_prob: expected a probability in [0, 1], got {diversity_prob}")

    def _repr_fields(self):
        return {"decay": self.decay, "resize_rate": self.resize_rate,
                "diversity_prob": self.diversity_prob, "random_start": self.random_start}

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        if not self.random_start or self.eps == 0.0:
            return x_nat.clone()
        return self._uniform_start(x_nat, gen)

    def _sizes(self, x: Tensor) -> Tuple[int, int]:
        if x.dim() != 4:
            raise ValueError(f"x: {self._name()}'s input diversity needs images [B, C, H, W], "
                             f"got shape {tuple(x.shape)}")
        w = x.shape[-1]
        small, big = int(w * self.resize_rate), w
        if self.resize_rate >= 1:
            small, big = w, int(w * self.resize_rate)
        if small >= big:
            raise ValueError(f"resize_rate: {self.resize_rate} leaves no size to draw for images of "
                             f"width {w} (int({w}·resize_rate) must differ from {w})")
        return small, big

    def _draw(self, x: Tensor) -> Optional[Tuple[int, int, int, int]]:
        """One step's (size, pad top, pad left, padded size), or None where the step takes
        the plain gradient; drawn as torchattacks draws them (size, top, left, coin)."""
        small, big = self._sizes(x)
        gen = self._draw_cpu_generator()
        rnd = int(torch.randint(small, big, (1,), generator=gen, dtype=torch.int32))
        rem = big - rnd
        top = int(torch.randint(0, rem, (1,), generator=gen, dtype=torch.int32))
        left = int(torch.randint(0, rem, (1,), generator=gen, dtype=torch.int32))
        apply = bool(torch.rand(1, generator=gen) < self.diversity_prob)
        return (rnd, top, left, big) if apply else None

    def _diverse_pass(self, rows: Rows):
        x, y, t = rows["x"], rows["y"], rows["t"]
        draw = self._draw(x)
        if draw is None:
            _, z, g = self._pass(x, y, t)
            return z, g
        rnd, top, left, big = draw
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            u = F.interpolate(xg, size=[rnd, rnd], mode="bilinear", align_corners=False)
            u = F.pad(u, [left, big - rnd - left, top, big - rnd - top], value=0)
        _, _, gu = self._pass(u.detach(), y, t)
        (g,) = torch.autograd.grad(u, xg, gu)
        return None, g

    def _direction(self, rows: Rows, k: int, first):
        z, g = self._diverse_pass(rows)
        return self._accumulate(rows, self._smooth(g)), z

    def _smooth(self, g: Tensor) -> Tensor:
        return g


class TIFGSM(DIFGSM):
    """TI-FGSM (Dong et al. 2019, "Evading Defenses to Transferable Adversarial Examples by
    Translation-Invariant Attacks"), drop-in for ``torchattacks.TIFGSM(model, eps=8/255,
    alpha=2/255, steps=10, decay=0.0, kernel_name="gaussian", len_kernel=15, nsig=3,
    resize_rate=0.9, diversity_prob=0.5, random_start=False)``: DI²-FGSM with each
    gradient smoothed per channel by a ``len_kernel``² kernel (``"gaussian"`` over
    ``[-nsig, nsig]``, ``"linear"`` or ``"uniform"``). Any channel count (torchattacks'
    is fixed at 3)."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, decay: float = 0.0, kernel_name: str = "gaussian",
                 len_kernel: int = 15, nsig: float = 3, resize_rate: float = 0.9,
                 diversity_prob: float = 0.5, random_start: bool = False, **options):
        if kernel_name not in ("gaussian", "linear", "uniform"):
            raise ValueError(f"kernel_name: expected 'gaussian', 'linear' or 'uniform', got {kernel_name!r}")
        self.kernel_name = kernel_name
        self.len_kernel = int_arg("len_kernel", len_kernel, 1)
        self.nsig = Attack._nonneg("nsig", nsig)
        self.kernel = smoothing_kernel(kernel_name, self.len_kernel, self.nsig)
        self._kernels: dict = {}
        self._set_diversity(resize_rate, diversity_prob)
        _Momentum.__init__(self, "TIFGSM", model, eps, alpha, steps, decay, random_start, **options)

    def _repr_fields(self):
        return {**super()._repr_fields(), "kernel_name": self.kernel_name,
                "len_kernel": self.len_kernel, "nsig": self.nsig}

    def _smooth(self, g: Tensor) -> Tensor:
        c = g.shape[1]
        key = (g.device, g.dtype, c)
        w = self._kernels.get(key)
        if w is None:
            w = self.kernel.to(g.device, g.dtype).expand(c, 1, -1, -1).contiguous()
            self._kernels[key] = w
        return F.conv2d(g, w, stride=1, padding="same", groups=c)


def smoothing_kernel(kernel_name: str, len_kernel: int, nsig: float = 3) -> Tensor:
    """TI-FGSM's ``len_kernel``² kernel (float32, sums to 1): the outer product of a normal
    density on ``len_kernel`` points over ``[-nsig, nsig]`` ("gaussian"), of a triangle
    ("linear"), or constant ("uniform")."""
    k = len_kernel
    if kernel_name == "gaussian":
        x = torch.linspace(-nsig, nsig, k, dtype=torch.float64)
        k1 = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    elif kernel_name == "linear":
        x = torch.linspace((-k + 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
        k1 = 1 - torch.abs(x / (k + 1) * 2)
    elif kernel_name == "uniform":
        return torch.full((k, k), 1.0 / (k * k), dtype=torch.float64).float()
    else:
        raise ValueError(f"kernel_name: expected 'gaussian', 'linear' or 'uniform', got {kernel_name!r}")
    raw = torch.outer(k1, k1)
    return (raw / raw.sum()).float()
