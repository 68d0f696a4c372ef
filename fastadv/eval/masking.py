"""Self-checks for gradient masking: each one says whether it fired and why, and warns.

A robust-accuracy figure is only as good as the attack behind it. These checks
look for the usual ways a model defeats gradient-based attacks without being
robust (Athalye et al. 2018; Croce & Hein 2020, "sanity checks"):

- ``check_randomness``      the model gives different outputs for the same input
- ``check_softmax_output``  the model returns probabilities, not logits
- ``check_gradients``       zero or non-finite input gradients
- ``square_beats_whitebox`` the black-box Square fooled points the white-box attacks could not
- ``check_large_eps``       robust accuracy does not reach 0 at a very large eps
- ``check_more_effort``     more steps or restarts give a *higher* robust accuracy

``check_gradient_masking`` runs them all; AutoAttack runs the cheap ones itself.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..attacks.base import Attack, AttackResult, InputIndependentError, model_context

__all__ = ["GradientMaskingWarning", "MaskingCheck", "check_randomness", "check_softmax_output",
           "check_gradients", "square_beats_whitebox", "check_large_eps", "check_more_effort",
           "run_model_checks", "check_gradient_masking"]


class GradientMaskingWarning(UserWarning):
    """An evaluation self-check found a sign of gradient masking."""


@dataclass
class MaskingCheck:
    """The outcome of one self-check: ``fired`` and, if so, the reason."""
    name: str
    fired: bool
    reason: str = ""
    details: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return {"name": self.name, "fired": self.fired, "reason": self.reason,
                "details": {k: (v if isinstance(v, (int, float, str, bool, list)) or v is None else str(v))
                            for k, v in self.details.items()}}


def _emit(check: MaskingCheck, warn: bool) -> MaskingCheck:
    if warn and check.fired:
        warnings.warn(f"[{check.name}] {check.reason}", GradientMaskingWarning, stacklevel=3)
    return check


class _Probe(Attack):
    """A do-nothing attack: the base class's model handling (normalisation, mode, amp)."""

    def __init__(self, model, **kw):
        super().__init__("probe", model, **kw)


def _as_attack(model_or_attack) -> Attack:
    if isinstance(model_or_attack, Attack):
        return model_or_attack
    return _Probe(model_or_attack)


def _ctx(atk: Attack, x: Tensor):
    return model_context(atk.model, atk.model_mode, x.device)



# ------------------------------------------------------------- model checks
def check_randomness(model, x: Tensor, repeats: int = 3, warn: bool = True) -> MaskingCheck:
    """Fires if the same input gives different logits across forward passes (dropout at
    test time, random transforms, ...): deterministic attacks then see a moving target;
    use ``AutoAttack(version="rand")`` (EOT) for such models."""
    atk = _as_attack(model)
    with _ctx(atk, x), torch.no_grad():
        outs = [atk.logits(x).float() for _ in range(max(2, repeats))]
    ref = outs[0]
    scale = ref.abs().max().clamp_min(1e-6)
    diff = max(float((o - ref).abs().max() / scale) for o in outs[1:])
    fired = diff > 1e-5
    reason = (f"the model's outputs change between identical forward passes (max relative "
              f"difference {diff:.2e}): it is randomised; evaluate with version='rand' (EOT)"
              if fired else "")
    return _emit(MaskingCheck("randomness", fired, reason, {"max_rel_diff": diff}), warn)


def check_softmax_output(model, x: Tensor, warn: bool = True) -> MaskingCheck:
    """Fires if the outputs look like probabilities (in [0, 1], rows summing to 1) or
    log-probabilities: the attacks' losses (CE, DLR) expect logits, and softmax outputs
    saturate their gradients."""
    atk = _as_attack(model)
    with _ctx(atk, x), torch.no_grad():
        z = atk.logits(x).float()
    probs = bool(((z >= -1e-6) & (z <= 1 + 1e-6)).all()) and bool(
        ((z.sum(1) - 1).abs() < 1e-3).all())
    logp = bool((z <= 1e-6).all()) and bool((torch.logsumexp(z, 1).abs() < 1e-3).all())
    fired = probs or logp
    kind = "probabilities (softmax)" if probs else "log-probabilities (log-softmax)"
    reason = (f"the model returns {kind} instead of logits: remove the final softmax before "
              f"evaluating" if fired else "")
    return _emit(MaskingCheck("softmax_output", fired, reason, {"softmax": probs, "log_softmax": logp}), warn)


def check_gradients(model, x: Tensor, y: Tensor, warn: bool = True) -> MaskingCheck:
    """Fires if the input gradient of the classification margin is zero or non-finite
    for some points (quantised or otherwise non-differentiable layers, saturations)."""
    atk = _as_attack(model)

    def margin_loss(z, y_, _t):
        z = z.float()
        zy = z.gather(1, y_[:, None]).squeeze(1)
        zo = z.scatter(1, y_[:, None], -math.inf).amax(1)
        return zo - zy

    with _ctx(atk, x):
        try:
            _, _, g = atk.loss_and_grad(x.float(), y.long(), None, margin_loss)
        except InputIndependentError:
            g = None   # no autograd path from the logits to x at all: the extreme case
    if g is None:
        n = x.shape[0]
        return _emit(MaskingCheck(
            "gradients", True, "the logits have no gradient path to the input (detached or computed "
            "without autograd): gradient-based attacks cannot run, only black-box ones (Square) "
            "can test this model", {"zero": n, "non_finite": 0, "n": n}), warn)
    g = g.reshape(g.shape[0], -1)
    nonfinite = ~torch.isfinite(g).all(1)
    zero = (g == 0).all(1) & ~nonfinite
    n0, nf, n = int(zero.sum()), int(nonfinite.sum()), g.shape[0]
    fired = n0 > 0 or nf > 0
    parts = []
    if n0:
        parts.append(f"{n0} of {n} points have an all-zero input gradient")
    if nf:
        parts.append(f"{nf} of {n} points have a non-finite input gradient")
    reason = ("; ".join(parts) + ": gradient-based attacks cannot make progress there, the robust "
              "accuracy may be overestimated") if fired else ""
    return _emit(MaskingCheck("gradients", fired, reason, {"zero": n0, "non_finite": nf, "n": n}), warn)


def square_beats_whitebox(result: AttackResult, warn: bool = True) -> MaskingCheck:
    """Fires if Square (black-box) fooled points that all white-box attacks before it
    missed: the gradients are not showing the way (the reference's own check)."""
    names = result.extra.get("attacks", [])
    per = result.extra.get("per_attack", {})
    if "square" not in per:
        return MaskingCheck("square_beats_whitebox", False, "", {"n": 0})
    k = int(per["square"].sum())
    whitebox_before = [n for n in names[: names.index("square")] if n != "square"]
    fired = k > 0 and bool(whitebox_before)
    reason = (f"Square (black-box) fooled {k} point(s) that the white-box attacks "
              f"({', '.join(whitebox_before)}) could not: a sign of gradient masking" if fired else "")
    return _emit(MaskingCheck("square_beats_whitebox", fired, reason, {"n": k}), warn)


def run_model_checks(model, x: Tensor, y: Tensor, warn: bool = True) -> List[MaskingCheck]:
    """The checks that need only a few forward/backward passes: randomness, softmax, gradients."""
    return [check_randomness(model, x, warn=warn), check_softmax_output(model, x, warn=warn),
            check_gradients(model, x, y, warn=warn)]


# ---------------------------------------------------------- attack checks
def _big_eps(norm: str, x: Tensor, lower: float, upper: float) -> float:
    span = upper - lower
    if norm == "Linf":
        return span  # the whole box
    d = x[0].numel()
    return span * (math.sqrt(d) if norm == "L2" else d)


def check_large_eps(model, x: Tensor, y: Tensor, norm: str = "Linf", eps: Optional[float] = None,
                    steps: int = 20, lower: float = 0.0, upper: float = 1.0, seed: int = 0,
                    warn: bool = True, **attack_kwargs) -> MaskingCheck:
    """Fires if APGD-CE leaves points robust at a very large eps (by default the whole
    input box): with an unbounded budget every point can be moved to another class, so
    a remaining robust point means the attack is being blocked."""
    from ..attacks.apgd import APGD
    e = _big_eps(norm, x, lower, upper) if eps is None else float(eps)
    # the whole box is the point of this check: its budget is meant to cover it
    attack_kwargs = dict(attack_kwargs, allow_large_eps=True)
    atk = APGD(model, norm, e, steps, 1, seed, "ce", lower=lower, upper=upper, **attack_kwargs)
    res = atk.run(x, y)
    acc = 1.0 - res.success.float().mean().item()
    fired = acc > 0
    reason = (f"robust accuracy is {acc:.2%} at eps = {e:.4g} ({norm}), where it should be 0: "
              f"the gradients do not lead the attack" if fired else "")
    return _emit(MaskingCheck("large_eps", fired, reason, {"eps": e, "robust_accuracy": acc}), warn)


def check_more_effort(model, x: Tensor, y: Tensor, eps: float, norm: str = "Linf",
                      steps: Sequence[int] = (10, 100), restarts: Sequence[int] = (1, 3),
                      seed: int = 0, tolerance: Optional[float] = None, warn: bool = True,
                      **attack_kwargs) -> MaskingCheck:
    """Fires if a stronger APGD-CE (more steps, more restarts) gives a *higher* robust
    accuracy than a weaker one by more than ``tolerance`` (default: 1 point or 1%,
    whichever is larger), which a well-behaved loss landscape does not do."""
    from ..attacks.apgd import APGD
    accs = {}
    for s_, r_ in ((steps[0], restarts[0]), (steps[-1], restarts[0]), (steps[-1], restarts[-1])):
        if (s_, r_) in accs:
            continue
        atk = APGD(model, norm, eps, s_, r_, seed, "ce", **attack_kwargs)
        accs[(s_, r_)] = 1.0 - atk.run(x, y).success.float().mean().item()
    tol = tolerance if tolerance is not None else max(1.0 / max(len(x), 1), 0.01)
    keys = list(accs)
    worse = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:] if accs[b] > accs[a] + tol]
    fired = bool(worse)
    reason = ""
    if fired:
        a, b = worse[0]
        reason = (f"more effort gave a higher robust accuracy: {accs[b]:.2%} with {b[0]} steps × "
                  f"{b[1]} restarts vs {accs[a]:.2%} with {a[0]} × {a[1]}")
    return _emit(MaskingCheck("more_effort", fired, reason,
                              {f"{k[0]}x{k[1]}": v for k, v in accs.items()}), warn)


def check_gradient_masking(model, x: Tensor, y: Tensor, eps: float, norm: str = "Linf",
                           result: Optional[AttackResult] = None, lower: float = 0.0,
                           upper: float = 1.0, steps: Sequence[int] = (10, 100), seed: int = 0,
                           warn: bool = True, **attack_kwargs) -> List[MaskingCheck]:
    """All the self-checks on ``(x, y)``; pass an AutoAttack ``result`` for the Square check."""
    atk = _Probe(model, lower=lower, upper=upper, **{k: v for k, v in attack_kwargs.items()
                                                     if k in ("normalization", "amp", "model_mode")})
    out = run_model_checks(atk, x, y, warn=warn)
    if result is not None:
        out.append(square_beats_whitebox(result, warn=warn))
    out.append(check_large_eps(model, x, y, norm, None, steps[0], lower, upper, seed, warn,
                               **attack_kwargs))
    out.append(check_more_effort(model, x, y, eps, norm, steps, (1, 3), seed, None, warn,
                                 lower=lower, upper=upper, **attack_kwargs))
    return out
