"""White-box L∞ sign-gradient attacks of torchattacks' catalogue: BIM, R+FGSM, FFGSM,
EOT-PGD, UPGD, TPGD and Jitter, drop-in for torchattacks' classes of the same names.

Each is PGD with another start, loss or gradient estimate, on PGD's engine: the fused
``linf_step_``, input-only gradients, restarts as one batch where the attack is random,
torchattacks' last iterate per sample by default (``keep="last"``, as PGD's;
``keep="best"``, implied by ``early_stop``, returns each sample's first successful iterate,
else its highest-loss one), amp, the model given back as found.
Constructor names, order and defaults are torchattacks 3.5.1's; fastadv's options
(``restarts``, ``keep``, ``early_stop``, ``amp``, ``seed``, ...) are keywords.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses as _losses
from ._catalogue import CatalogueAttack, Rows, decay_arg, mean_abs_normalized
from .base import Attack, int_arg, model_context
from .pgd import _IterativeAttack

__all__ = ["BIM", "RFGSM", "FFGSM", "EOTPGD", "UPGD", "TPGD", "Jitter"]


def _refuse(name: str, options: dict, keys) -> None:
    for k in keys:
        if k in options:
            raise TypeError(f"{name}: unexpected keyword {k!r}")


class BIM(_IterativeAttack):
    """The basic iterative method (I-FGSM; Kurakin, Goodfellow & Bengio 2017, "Adversarial
    Examples in the Physical World"), drop-in for ``torchattacks.BIM``.

    ``BIM(model, eps=8/255, alpha=2/255, steps=10, *, keep="last"|"best", loss, targeted,
    early_stop, amp, ...)``: PGD without a random start. ``steps=0`` picks the paper's
    count, ``int(min(255·eps + 4, 1.25·255·eps))``, as torchattacks does."""

    norm = "linf"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, **options):
        _refuse("BIM", options, ("random_start", "restarts"))
        eps_v = Attack._nonneg("eps", eps)
        steps = int_arg("steps", steps, 0)
        if steps == 0:
            steps = int(min(eps_v * 255 + 4, 1.25 * eps_v * 255))
        super().__init__("BIM", model, eps, alpha, steps, False, **options)


class RFGSM(_IterativeAttack):
    """R+FGSM (Tramèr et al. 2018, "Ensemble Adversarial Training: Attacks and Defenses"),
    drop-in for ``torchattacks.RFGSM``: a random step ``alpha·sign(N(0, I))`` from x, then
    ``steps`` projected sign steps of ``alpha`` (torchattacks' iterated form).

    A start further from x than ``eps`` (``alpha > eps``) is brought into the ball, so that
    every iterate the attack may return lies inside it. ``restarts`` run as one batch."""

    norm = "linf"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, **options):
        _refuse("RFGSM", options, ("random_start",))
        super().__init__("RFGSM", model, eps, alpha, steps, True, **options)

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        from .. import ops
        noise = torch.randn(x_nat.shape, generator=gen, device=x_nat.device, dtype=torch.float32)
        x0 = (x_nat + self.alpha * noise.sign()).clamp_(self.lower, self.upper)
        x0 = x0.contiguous(memory_format=_memory_format(x_nat))
        return ops.linf_project_(x0, x_nat, self.eps, self.lower, self.upper, backend=self.backend,
                                 _check_values=False)


class FFGSM(_IterativeAttack):
    """FGSM from a random start ("Fast is better than free", Wong, Rice & Kolter 2020),
    drop-in for ``torchattacks.FFGSM``: a uniform start in the eps-ball, then one sign step
    of ``alpha`` (default 10/255, 1.25·eps), projected. With ``keep="best"`` the start, the
    step and the clean point compete; ``restarts`` run as one batch."""

    norm = "linf"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 10 / 255, **options):
        _refuse("FFGSM", options, ("random_start", "steps"))
        super().__init__("FFGSM", model, eps, alpha, 1, True, **options)

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        # torchattacks draws a normal tensor and overwrites it with U(-eps, eps): the same
        # draws, so that a seed reproduces its start
        u = torch.randn(x_nat.shape, generator=gen, device=x_nat.device, dtype=torch.float32)
        u.uniform_(-self.eps, self.eps, generator=gen)
        x0 = (x_nat + u).clamp_(self.lower, self.upper)
        return x0.contiguous(memory_format=_memory_format(x_nat))


def _memory_format(t: Tensor):
    from ._engine import memory_format
    return memory_format(t)


class EOTPGD(CatalogueAttack):
    """PGD with expectation over transformation (Zimmermann 2019, "Comment on 'Adv-BNN:
    Improved Adversarial Defense through Robust Bayesian Neural Network'"), drop-in for
    ``torchattacks.EOTPGD``: each step's gradient is the sum of ``eot_iter`` gradients at
    the same point, for a model that is random (dropout in ``model_mode="train"``, a
    randomized defence). The passes run one after the other, as in torchattacks, so a
    model that draws its randomness once per batch still gets ``eot_iter`` draws."""

    plain_first_pass = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, eot_iter: int = 2, random_start: bool = True, **options):
        super().__init__("EOTPGD", model, eps, alpha, steps, random_start, **options)
        self.eot_iter = int_arg("eot_iter", eot_iter, 1)

    def _repr_fields(self):
        return {"eot_iter": self.eot_iter, "random_start": self.random_start}

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        if not self.random_start or self.eps == 0.0:
            return x_nat.clone()
        return self._uniform_start(x_nat, gen)

    def _direction(self, rows: Rows, k: int, first):
        x, y, t = rows["x"], rows["y"], rows["t"]
        total = z0 = None
        for j in range(self.eot_iter):
            _, z, g = first if (j == 0 and first is not None) else self._pass(x, y, t)
            if j == 0:
                total, z0 = g, z
            else:
                total = total + g
        return total, z0


class UPGD(CatalogueAttack):
    """torchattacks' "ultimate PGD" (``torchattacks.UPGD``): PGD with momentum on
    mean-|g|-scaled gradients (MI-FGSM's update, Dong et al. 2018, "Boosting Adversarial
    Attacks with Momentum"), an optional uniform start, an EOT average of ``eot_iter``
    gradients, and the loss ``"ce"``, ``"margin"`` (the C&W margin clipped at 0, Carlini &
    Wagner 2017) or ``"dlr"`` (Croce & Hein 2020).

    ``"dlr"`` is the published DLR, ``-(z_y - max_{j≠y} z_j) / (z_π1 - z_π3)`` (targeted:
    its targeted form); torchattacks 3.5.1 drops the ``max_{j≠y} z_j`` term. ``"cw"``
    (fastadv's unclipped margin) is accepted too. A callable loss is not supported."""

    plain_first_pass = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, random_start: bool = False, loss: str = "ce",
                 decay: float = 1.0, eot_iter: int = 1, **options):
        if callable(loss) and not isinstance(loss, str):
            raise TypeError("loss: a callable loss is not supported by fastadv's UPGD; expected "
                            "'ce', 'margin', 'dlr' or 'cw'")
        if loss not in ("ce", "margin", "dlr", "cw"):
            raise ValueError(f"loss: expected 'ce', 'margin', 'dlr' or 'cw', got {loss!r}")
        self._margin = loss == "margin"
        super().__init__("UPGD", model, eps, alpha, steps, random_start,
                         loss="cw" if loss == "margin" else loss, **options)
        self.loss_name = loss
        self.decay = decay_arg(decay)
        self.eot_iter = int_arg("eot_iter", eot_iter, 1)

    def _repr_fields(self):
        return {"random_start": self.random_start, "loss_name": self.loss_name,
                "decay": self.decay, "eot_iter": self.eot_iter}

    def attack_loss(self, logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        if self._margin:  # torchattacks' margin: the C&W loss with kappa = 0
            if target is not None:
                return _losses.cw_loss(logits, target, kappa=0.0, targeted=True)
            return _losses.cw_loss(logits, y, kappa=0.0)
        return super().attack_loss(logits, y, target)

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        if not self.random_start or self.eps == 0.0:
            return x_nat.clone()
        return self._uniform_start(x_nat, gen)

    def _init_state(self, rows: Rows, samples: int) -> None:
        rows["m"] = torch.zeros_like(rows["x"])

    def _direction(self, rows: Rows, k: int, first):
        x, y, t = rows["x"], rows["y"], rows["t"]
        grad = z0 = None
        for j in range(self.eot_iter):
            _, z, g = first if (j == 0 and first is not None) else self._pass(x, y, t)
            g = g / self.eot_iter
            if j == 0:
                grad, z0 = g, z
            else:
                grad = grad + g
        m = rows["m"]
        m.mul_(self.decay).add_(mean_abs_normalized(grad))
        return m, z0


class TPGD(CatalogueAttack):
    """TRADES' attack (Zhang et al. 2019, "Theoretically Principled Trade-off between
    Robustness and Accuracy"), drop-in for ``torchattacks.TPGD``: PGD on
    ``KL(p(x) ‖ p(x'))`` from ``x + 0.001·N(0, I)``. Needs no labels: ``atk(x)`` attacks
    the model's own predictions (``success``: the prediction changed); with labels,
    success is misclassification, as for every attack. Untargeted only, as in torchattacks.
    Failed iterates are ranked by the cross-entropy (``loss=``) for ``keep="best"``."""

    targets_supported = False  # torchattacks' supported_mode ["default"]: the setters refuse

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, **options):
        _refuse("TPGD", options, ("random_start", "targeted"))
        super().__init__("TPGD", model, eps, alpha, steps, True, **options)

    def run(self, x: Tensor, y: Optional[Tensor] = None, target: Optional[Tensor] = None):
        if target is not None or self.targeted:
            raise ValueError("TPGD: untargeted only (its loss compares with the clean "
                             "prediction, not with a target); call set_mode_default()")
        if y is None:
            y = self._predictions(x)
        return super().run(x, y)

    def __call__(self, x: Tensor, y: Optional[Tensor] = None, target: Optional[Tensor] = None) -> Tensor:
        return self.run(x, y, target).x_adv

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self(x, y)

    def _predictions(self, x: Tensor) -> Tensor:
        self._refuse_inference_mode()
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        xp = self._from_user(x)
        xf, _ = self._prepare(xp, torch.zeros(xp.shape[:1], dtype=torch.long, device=xp.device))
        with torch.no_grad(), model_context(self.model, self.model_mode, xf.device):
            return self.exact_logits(xf).argmax(1)

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        noise = torch.randn(x_nat.shape, generator=gen, device=x_nat.device, dtype=torch.float32)
        x0 = (x_nat + 0.001 * noise).clamp_(self.lower, self.upper)
        return self._into_ball(x0.contiguous(memory_format=_memory_format(x_nat)), x_nat)

    def _init_state(self, rows: Rows, samples: int) -> None:
        x_nat = rows["x_nat"]
        with torch.no_grad():
            z = self.logits(x_nat[:samples]).float()
        reps = x_nat.shape[0] // max(samples, 1)
        rows["z_clean"] = torch.cat([z] * reps) if reps > 1 else z

    @staticmethod
    def _kl(z: Tensor, y: Tensor, z_clean: Tensor) -> Tensor:
        # torchattacks: KLDivLoss(sum)(log_softmax(z_adv), softmax(z_clean)), per row here
        return F.kl_div(F.log_softmax(z.float(), dim=1), F.softmax(z_clean, dim=1),
                        reduction="none").sum(1)

    def _direction(self, rows: Rows, k: int, first):
        _, z, g = self._pass(rows["x"], rows["y"], rows["z_clean"], self._kl)
        return g, z


class Jitter(CatalogueAttack):
    """Jitter (Schwinn et al. 2021, "Exploring Misclassifications of Robust Neural Networks
    to Enhance Adversarial Attacks"), drop-in for ``torchattacks.Jitter``: PGD on the squared
    error between a noisy (``std``), temperature-scaled (``scale``) softmax and the one-hot
    label, divided by ``‖x' - x‖∞`` once the point is misclassified (so that fooled points
    look for a smaller perturbation). Failed iterates are ranked by the cross-entropy
    (``loss=``) for ``keep="best"``; ``restarts`` run as one batch."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, scale: float = 10, std: float = 0.1, random_start: bool = True,
                 **options):
        self.scale = self._real("scale", scale)
        if not abs(self.scale) < float("inf"):
            raise ValueError(f"scale: expected a finite number, got {scale}")
        self.std = self._nonneg("std", std)
        self.randomized = self.std != 0.0   # the softmax noise differs between restarts
        self._targeted_run = False
        super().__init__("Jitter", model, eps, alpha, steps, random_start, **options)

    def _repr_fields(self):
        return {"scale": self.scale, "std": self.std, "random_start": self.random_start}

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        if not self.random_start or self.eps == 0.0:
            return x_nat.clone()
        return self._uniform_start(x_nat, gen)

    def _init_state(self, rows: Rows, samples: int) -> None:
        z = self.clean_logits
        if z is None:
            with torch.no_grad():
                z = self.logits(rows["x_nat"][:1]).float()
        self._classes = int(z.shape[1])

    def _score(self, z: Tensor, y: Tensor, aux: Tensor) -> Tensor:
        """The squared error of the noisy scaled softmax to the one-hot label, per row (to
        maximise; targeted: its negative towards the target). ``aux``: [noise | label]."""
        c = self._classes
        zf = z.float()
        norm = zf.abs().amax(1, keepdim=True).clamp_min(1e-30)
        hat = F.softmax(self.scale * zf / norm, dim=1)
        if self.std != 0:
            hat = hat + self.std * aux[:, :c]
        label = aux[:, c].long()
        err = (hat - F.one_hot(label, c).float()).pow(2).mean(1)
        return -err if self._targeted_run else err

    def _direction(self, rows: Rows, k: int, first):
        x, x_nat, y, t = rows["x"], rows["x_nat"], rows["y"], rows["t"]
        n, c = x.shape[0], self._classes
        if self.std != 0:
            noise = torch.randn((n, c), generator=self._gen, device=x.device, dtype=torch.float32)
        else:
            noise = torch.zeros((n, c), device=x.device)
        self._targeted_run = t is not None
        label = (t if t is not None else y).to(torch.float32)[:, None]
        score, z, g = self._pass(x, y, torch.cat([noise, label], 1), self._score)
        # rows already misclassified: the score divided by r = ‖x' - x‖∞, differentiated
        # through r too (its gradient is spread over the elements at the max, as autograd's)
        d = (x - x_nat).flatten(1)
        r = d.abs().amax(1)
        sel = (z.argmax(1) != y) & (r != 0)
        at_max = (d.abs() == r[:, None]) & sel[:, None]
        dr = torch.where(at_max, d.sign(), 0.0) / at_max.sum(1, keepdim=True).clamp_min(1)
        rs = torch.where(sel, r, 1.0)
        shape = (-1,) + (1,) * (g.dim() - 1)
        g_div = g / rs.view(shape) - (score / (rs * rs)).view(shape) * dr.view(g.shape)
        return torch.where(sel.view(shape), g_div, g), z
