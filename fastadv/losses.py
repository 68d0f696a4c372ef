"""Adversarial loss terms as plain functions on logits, per sample unless reduced.

Attack losses (``cross_entropy``, ``cw_loss``, ``dlr_loss``, ``dlr_loss_targeted``)
are oriented so that an attack always *maximises* them. Training terms
(``hinge_loss``, ``trades_kl``, ``mart_loss``) are what a defence minimises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reduce", "margin", "cross_entropy", "cw_loss", "hinge_loss", "dlr_loss",
    "dlr_loss_targeted", "trades_kl", "mart_bce", "mart_kl", "mart_loss", "attack_loss",
]

_DLR_EPS = 1e-12


def reduce(v: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return v
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    raise ValueError(f"reduction: expected 'none', 'mean' or 'sum', got {reduction!r}")


def _check(logits: Tensor, y: Tensor, name: str = "y") -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [B, classes], got {tuple(logits.shape)}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"{name}: expected shape [{logits.shape[0]}], got {tuple(y.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits: expected at least 2 classes, got {logits.shape[1]}")


def _true_and_best_other(logits: Tensor, y: Tensor):
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return z_y, others.max(dim=1).values


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j≠y} z_j per sample: positive where the sample is classified as ``y``."""
    _check(logits, y)
    z_y, z_o = _true_and_best_other(logits, y)
    return z_y - z_o


def cross_entropy(logits: Tensor, y: Tensor, reduction: str = "none") -> Tensor:
    """Cross-entropy in float32 (the loss of a plain PGD attack and of adversarial training)."""
    _check(logits, y)
    return F.cross_entropy(logits.float(), y, reduction=reduction)


def cw_loss(logits: Tensor, y: Tensor, kappa: float = float("inf"), targeted: bool = False,
            reduction: str = "none") -> Tensor:
    """The C&W margin loss, to maximise, capped at ``kappa``.

    Untargeted (``y`` the true class): min(max_{j≠y} z_j - z_y, kappa).
    Targeted (``y`` the target): min(z_y - max_{j≠y} z_j, kappa).
    """
    m = margin(logits, y)
    v = m if targeted else -m
    return reduce(v.clamp(max=kappa), reduction)


def hinge_loss(logits: Tensor, y: Tensor, m: float = 1.0, reduction: str = "mean") -> Tensor:
    """max(0, m - margin): the hinge on the classification margin, to minimise."""
    return reduce((m - margin(logits, y)).clamp(min=0.0), reduction)


def dlr_loss(logits: Tensor, y: Tensor, reduction: str = "none") -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020), to maximise:
    -(z_y - max_{j≠y} z_j) / (z_π1 - z_π3), π the classes sorted by logit, descending."""
    _check(logits, y)
    if logits.shape[1] < 3:
        raise ValueError(f"logits: DLR needs at least 3 classes, got {logits.shape[1]}")
    z = logits.float()
    top = z.topk(3, dim=1).values
    v = -margin(z, y) / (top[:, 0] - top[:, 2] + _DLR_EPS)
    return reduce(v, reduction)


def dlr_loss_targeted(logits: Tensor, y: Tensor, target: Tensor, reduction: str = "none") -> Tensor:
    """Targeted DLR (Croce & Hein 2020), to maximise:
    -(z_y - z_t) / (z_π1 - (z_π3 + z_π4)/2)."""
    _check(logits, y)
    _check(logits, target, "target")
    if logits.shape[1] < 4:
        raise ValueError(f"logits: targeted DLR needs at least 4 classes, got {logits.shape[1]}")
    z = logits.float()
    top = z.topk(4, dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    v = -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS)
    return reduce(v, reduction)


def trades_kl(logits_adv: Tensor, logits_nat: Tensor, reduction: str = "none") -> Tensor:
    """KL(p_nat ‖ p_adv) per sample, the TRADES robustness term (Zhang et al. 2019).

    Differentiable in both arguments; TRADES' inner attack maximises it over the
    adversarial input, the outer step minimises CE(nat) + β·mean(KL)."""
    if logits_adv.shape != logits_nat.shape:
        raise ValueError(f"logits_adv: expected shape {tuple(logits_nat.shape)} (that of logits_nat), "
                         f"got {tuple(logits_adv.shape)}")
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    log_p_nat = F.log_softmax(logits_nat.float(), dim=1)
    v = (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(dim=1)
    return reduce(v, reduction)


def mart_bce(logits_adv: Tensor, y: Tensor, reduction: str = "none") -> Tensor:
    """MART's boosted CE (Wang et al. 2020): CE(adv) - log(1 - max_{k≠y} p_adv,k)."""
    _check(logits_adv, y)
    p = F.softmax(logits_adv.float(), dim=1)
    p_other = p.scatter(1, y[:, None], 0.0).max(dim=1).values
    v = F.cross_entropy(logits_adv.float(), y, reduction="none") - torch.log(
        (1.0 - p_other).clamp_min(1e-12))
    return reduce(v, reduction)


def mart_kl(logits_adv: Tensor, logits_nat: Tensor, y: Tensor, reduction: str = "none") -> Tensor:
    """MART's misclassification-aware term: KL(p_nat ‖ p_adv)·(1 - p_nat,y)."""
    _check(logits_nat, y)
    p_nat_y = F.softmax(logits_nat.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    v = trades_kl(logits_adv, logits_nat) * (1.0 - p_nat_y)
    return reduce(v, reduction)


def mart_loss(logits_adv: Tensor, logits_nat: Tensor, y: Tensor, beta: float = 6.0) -> Tensor:
    """The MART training objective: mean(BCE) + β·mean(KL·(1 - p_nat,y))."""
    return mart_bce(logits_adv, y, "mean") + beta * mart_kl(logits_adv, logits_nat, y, "mean")


_ATTACK_LOSSES = ("ce", "cw", "dlr")


def attack_loss(name: str, logits: Tensor, y: Tensor, targeted: bool = False,
                target: Tensor | None = None) -> Tensor:
    """The per-sample loss an attack maximises: ``name`` in ("ce", "cw", "dlr").

    Untargeted: ``y`` the true labels. Targeted: ``target`` the targets (``y`` the
    true labels, used by the targeted DLR); CE becomes -CE(target)."""
    if name not in _ATTACK_LOSSES:
        raise ValueError(f"loss: expected one of {_ATTACK_LOSSES}, got {name!r}")
    if not targeted:
        if name == "ce":
            return cross_entropy(logits, y)
        if name == "cw":
            return cw_loss(logits, y)
        return dlr_loss(logits, y)
    if target is None:
        raise ValueError("target: a targeted loss needs target labels")
    if name == "ce":
        return -cross_entropy(logits, target)
    if name == "cw":
        return cw_loss(logits, target, targeted=True)
    return dlr_loss_targeted(logits, y, target)
