"""Robustness metrics: clean/robust accuracy (per attack, worst case, per class), the robust
accuracy-vs-eps curve in one pass, calibration under attack, and transfer robustness."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..attacks._groups import finite_rows
from ..attacks.apgd import APGD, APGDT
from ..attacks.base import Attack, int_arg, model_context, nonneg_numbers

__all__ = ["predict_logits", "predictions", "accuracy", "per_class_accuracy", "worst_case", "accuracy_summary",
           "autoattack_summary", "AutoAttackSummary",
           "robust_accuracy_curve", "calibration_bins", "expected_calibration_error",
           "calibration_under_attack", "transfer_robustness"]


class _Probe(Attack):
    def __init__(self, model, **kw):
        super().__init__("probe", model, **kw)


def predict_logits(model, x: Tensor, bs: int = 256, normalization=None) -> Tensor:
    """The model's float32 logits on ``x`` in eval mode, batch by batch (model state kept)."""
    _tensor("x", x)
    bs = int_arg("bs", bs, 1)
    probe = _Probe(model, normalization=normalization, check_inputs=False,
                   lower=-math.inf, upper=math.inf)
    out = []
    ctx = model_context(model, "eval", x.device)
    with ctx, torch.no_grad():
        for i in range(0, len(x), bs):
            out.append(probe.logits(x[i:i + bs].float()).float())
    return torch.cat(out) if out else torch.zeros(0, 0)


def predictions(logits: Tensor) -> Tensor:
    """[B] long: each row's argmax, or -1 where the row is not finite (NaN or inf). Such a
    row is no prediction: it never matches a label (never correct); as in the attacks
    (``finite_rows``), it must never count as fooled either: test ``pred != y`` only with
    ``pred >= 0``."""
    _tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [B, classes], got {tuple(logits.shape)}")
    if not logits.shape[1]:
        return torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    pred = logits.argmax(1)
    return torch.where(finite_rows(logits), pred, torch.full_like(pred, -1))


def _warn_nonfinite(where: str, counts: Mapping[str, int], n: int, what: str) -> None:
    """One warning per call naming how many rows had non-finite logits and how they counted."""
    parts = [f"{k} of {n} {name}" for name, k in counts.items() if k]
    if parts:
        warnings.warn(f"fastadv: {where}: the model returned non-finite logits (NaN or inf) for "
                      f"{' and '.join(parts)}; {what}", RuntimeWarning, stacklevel=3)



# ------------------------------------------------------------ validation
def _tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _labels(name: str, y, b: Optional[int] = None) -> Tensor:
    """``y`` checked to be integer class labels [B] (>= 0), of length ``b`` if given."""
    _tensor(name, y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    if y.dim() != 1 or (b is not None and y.shape[0] != b):
        want = "[B]" if b is None else f"[{b}]"
        raise ValueError(f"{name}: expected shape {want} (one label per point), got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name}: expected class labels >= 0, got {int(y.min())}")
    return y


def _mask(name: str, t, b: int) -> Tensor:
    _tensor(name, t)
    if t.shape != (b,):
        raise ValueError(f"{name}: expected a [B] = [{b}] per-point tensor, got shape {tuple(t.shape)}")
    return t


def _logits(name: str, z, b: Optional[int] = None) -> Tensor:
    _tensor(name, z)
    if z.dim() != 2 or (b is not None and z.shape[0] != b):
        raise ValueError(f"{name}: expected shape [B, classes], B = {b}, got {tuple(z.shape)}")
    if z.numel() and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return z


def check_eps_list(eps_list) -> List[float]:
    """``eps_list`` as a sorted list of finite floats >= 0 (a clear error otherwise)."""
    out = nonneg_numbers("eps_list", eps_list)
    if not out:
        raise ValueError("eps_list: expected at least one eps")
    return sorted(out)


# -------------------------------------------------------------- accuracy
def accuracy(correct: Tensor) -> float:
    return correct.double().mean().item() if correct.numel() else float("nan")


def per_class_accuracy(correct: Tensor, y: Tensor, n_classes: Optional[int] = None) -> List[float]:
    """Accuracy per true class (NaN for a class with no points)."""
    _labels("y", y)
    _mask("correct", correct, y.shape[0])
    if n_classes is not None:
        n_classes = int_arg("n_classes", n_classes, 1)
        if y.numel() and int(y.max()) >= n_classes:
            raise ValueError(f"y: expected labels in [0, {n_classes - 1}] for n_classes={n_classes}, "
                             f"got {int(y.max())}")
    n = int(n_classes if n_classes is not None else (int(y.max()) + 1 if y.numel() else 0))
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, y.cpu(), torch.ones(len(y), dtype=torch.float64))
    hit = torch.zeros(n, dtype=torch.float64).index_add_(0, y.cpu(), correct.cpu().double())
    return [(h / t).item() if t > 0 else float("nan") for h, t in zip(hit, tot)]


def worst_case(robust_per_attack: Mapping[str, Tensor]) -> Tensor:
    """A point is robust only if robust against every attack."""
    if not isinstance(robust_per_attack, Mapping):
        raise TypeError("robust_per_attack: expected a mapping attack name -> [B] bool tensor, got "
                        f"{type(robust_per_attack).__name__}")
    if not robust_per_attack:
        raise ValueError("robust_per_attack: expected at least one attack")
    shapes = {k: tuple(_tensor(f"robust_per_attack[{k!r}]", v).shape) for k, v in robust_per_attack.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"robust_per_attack: expected tensors of one shape, got {shapes}")
    it = iter(robust_per_attack.values())
    out = next(it).clone()
    for v in it:
        out &= v
    return out


def accuracy_summary(y: Tensor, clean_correct: Tensor, robust: Tensor,
                     per_attack: Optional[Mapping[str, Tensor]] = None,
                     attack_order: Optional[Sequence[str]] = None,
                     n_classes: Optional[int] = None) -> Dict[str, object]:
    """Clean and robust accuracy, overall and per class, and per attack.

    ``per_attack`` maps attack name -> [B] bool "fooled by this attack" (AutoAttack's
    ``extra["per_attack"]``); with ``attack_order`` the robust accuracy after each
    attack in sequence is reported too."""
    _labels("y", y)
    b = y.shape[0]
    _mask("clean_correct", clean_correct, b)
    _mask("robust", robust, b)
    for k, v in (per_attack or {}).items():
        _mask(f"per_attack[{k!r}]", v, b)
    if attack_order is not None and per_attack:
        missing = [k for k in attack_order if k not in per_attack]
        if missing:
            raise ValueError(f"attack_order: {missing} not in per_attack ({list(per_attack)})")
    out: Dict[str, object] = {"n": int(len(y)), "clean_accuracy": accuracy(clean_correct),
                              "robust_accuracy": accuracy(robust),
                              "per_class": {"clean": per_class_accuracy(clean_correct, y, n_classes),
                                            "robust": per_class_accuracy(robust, y, n_classes)}}
    if per_attack:
        out["fooled_by"] = {k: int(v.sum()) for k, v in per_attack.items()}
        order = list(attack_order or per_attack)
        still = clean_correct.clone()
        after = {}
        for k in order:
            still = still & ~per_attack[k].to(still.device)
            after[k] = accuracy(still)
        out["robust_accuracy_after"] = after
    return out


class AutoAttackSummary(list):
    """AutoAttack's run, one dict per attack in the order they ran: ``attack``, ``fooled``
    (points it fooled first: the ones the attacks before it left robust),
    ``robust_accuracy_after`` (robust accuracy once it has run) and ``time_s``; ``n`` and
    ``clean_accuracy`` as attributes. ``print`` shows it as a table."""

    def __init__(self, rows, n: int, clean_accuracy: float, robust_accuracy: float):
        super().__init__(rows)
        self.n, self.clean_accuracy, self.robust_accuracy = n, clean_accuracy, robust_accuracy

    def __str__(self) -> str:
        def pct(v):
            return "n/a" if v != v else f"{100 * v:.2f}%"
        width = max([len("clean")] + [len(r["attack"]) for r in self])
        lines = [f"{'attack':{width}}  fooled  robust after  time",
                 f"{'clean':{width}}  {'':>6}  {pct(self.clean_accuracy):>12}  (n={self.n})"]
        for r in self:
            lines.append(f"{r['attack']:{width}}  {r['fooled']:>6}  {pct(r['robust_accuracy_after']):>12}  "
                         f"{r['time_s']:.1f} s")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def autoattack_summary(result) -> AutoAttackSummary:
    """A readable summary of an AutoAttack run: per attack the points it fooled, the robust
    accuracy after it and its time. ``result``: the ``AutoAttack`` object after a run, its
    ``last_result``, or that result's ``extra`` dict (with ``clean``, ``per_attack`` — the
    [B] bool "fooled by this attack" masks —, ``attacks`` and ``time``)."""
    extra = result
    if hasattr(extra, "last_result"):
        extra = extra.last_result
        if extra is None:
            raise ValueError("result: this AutoAttack has not run yet (run_standard_evaluation first)")
    if hasattr(extra, "extra"):
        extra = extra.extra
    if not isinstance(extra, Mapping) or not all(k in extra for k in ("clean", "per_attack")):
        raise TypeError("result: expected an AutoAttack after a run, its last_result, or "
                        f"last_result.extra; got {type(result).__name__}")
    clean = _tensor("extra['clean']", extra["clean"]).bool().cpu()
    per_attack = extra["per_attack"]
    if not isinstance(per_attack, Mapping):
        raise TypeError(f"extra['per_attack']: expected a mapping attack -> [B] bool tensor, got "
                        f"{type(per_attack).__name__}")
    order = list(extra.get("attacks") or per_attack)
    times = extra.get("time") or {}
    b = clean.shape[0]
    still = clean.clone()
    rows = []
    for name in order:
        fooled = _mask(f"per_attack[{name!r}]", per_attack[name], b).bool().cpu()
        still &= ~fooled
        rows.append({"attack": name, "fooled": int(fooled.sum()), "robust_accuracy_after": accuracy(still),
                     "time_s": float(times.get(name, float("nan")))})
    robust = extra.get("robust")
    rob = accuracy(robust.bool().cpu()) if isinstance(robust, Tensor) else accuracy(still)
    return AutoAttackSummary(rows, b, accuracy(clean), rob)


# ------------------------------------------------------------- eps curve
def robust_accuracy_curve(model, x: Tensor, y: Tensor, eps_list: Sequence[float], norm: str = "Linf",
                          attacks: Sequence[str] = ("apgd-ce", "apgd-t"), steps: int = 100,
                          seed: int = 0, bs: Optional[int] = None, **attack_kwargs) -> Dict[str, object]:
    """Robust accuracy at every eps in ``eps_list`` in one pass.

    Every (point, eps) pair is a row of one batch (per-row eps), attacked by APGD-CE and
    then, on the survivors, APGD-T. A point fooled at some eps is fooled at every larger
    eps (the same perturbation), which is applied between attacks so the larger budgets
    need not be attacked again. Returns {"eps": [...], "robust_accuracy": [...],
    "clean_accuracy": float, "robust": [B, E] bool}."""
    eps = check_eps_list(eps_list)
    if isinstance(attacks, (str, bytes)) or not hasattr(attacks, "__iter__"):
        raise TypeError(f"attacks: expected a sequence of names such as ('apgd-ce', 'apgd-t'), got {attacks!r}")
    attacks = list(attacks)
    if not attacks:
        raise ValueError("attacks: expected at least one attack, e.g. ('apgd-ce', 'apgd-t')")
    if bs is not None:
        bs = int_arg("bs", bs, 1)
    e_n = len(eps)
    # every row gets its own eps; the attacks are built with the largest, so that their budget
    # check (allow_large_eps) covers the whole list
    top = max(eps)
    if isinstance(x, Tensor) and x.dim() >= 2:
        from ..budget import check_eps_budget
        from ..attacks._groups import norm_name
        check_eps_budget(top, norm_name(norm),
                         attack_kwargs.get("lower", 0.0), attack_kwargs.get("upper", 1.0),
                         math.prod(x.shape[1:]), bool(attack_kwargs.get("allow_large_eps", False)),
                         name="eps_list")
    builders = {"apgd-ce": lambda: APGD(model, norm, top, steps, 1, seed, "ce", **attack_kwargs),
                "apgd-dlr": lambda: APGD(model, norm, top, steps, 1, seed, "dlr", **attack_kwargs),
                "apgd-t": lambda: APGDT(model, norm, top, steps, 1, seed, **attack_kwargs)}
    bad = [a for a in attacks if a not in builders]
    if bad:
        raise ValueError(f"attacks: expected names from {sorted(builders)}, got {bad}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks: each attack at most once, got {attacks}")
    first = builders[attacks[0]]()
    xf, yl = first._prepare(x, y)
    b = len(xf)
    dev = xf.device
    ctx = model_context(model, first.model_mode, dev)
    with ctx:
        with torch.no_grad():
            z = first.logits(xf).float()
        # a point whose clean logits are not finite has no prediction: not correct, not robust
        clean = predictions(z) == yl
        clean_bad = ~finite_rows(z)
        met_bad = torch.zeros(b, dtype=torch.bool, device=dev)   # an attack met non-finite logits
        robust = clean[:, None].repeat(1, e_n)              # [B, E]
        eps_t = torch.tensor(eps, device=dev)
        gen = first.make_generator(dev)
        for name in attacks:
            atk = builders[name]() if name != attacks[0] else first
            todo = robust.reshape(-1).nonzero().squeeze(1)  # rows (point, eps)
            step = bs or max(len(todo), 1)
            for s in range(0, len(todo), step):
                rows = todo[s:s + step]
                pts, ei = rows // e_n, rows % e_n
                res = atk._run_points(xf.index_select(0, pts), yl.index_select(0, pts), None, gen,
                                      eps_t.index_select(0, ei))
                robust.view(-1)[rows[res.success]] = False
                nf = res.extra.get("nonfinite") if isinstance(res.extra, dict) else None
                if isinstance(nf, Tensor):
                    met_bad.index_fill_(0, pts[nf.to(dev)], True)
            # monotone in eps: fooled at eps_i means fooled at every eps_j >= eps_i
            robust = torch.cummin(robust.int(), dim=1).values.bool()
    accs = robust.float().mean(0).tolist() if b else [float("nan")] * e_n
    n_clean_bad, n_met_bad = int(clean_bad.sum()), int(met_bad.sum())
    _warn_nonfinite("robust_accuracy_curve", {"clean points": n_clean_bad,
                                              "points at perturbed inputs the attacks tried": n_met_bad}, b,
                    "a clean point with them counts as misclassified (so not robust); no point counted "
                    "as fooled on them, so the robust accuracy of the others may be overstated")
    return {"eps": eps, "robust_accuracy": accs, "clean_accuracy": accuracy(clean),
            "norm": norm, "attacks": list(attacks), "robust": robust,
            "nonfinite": {"clean": n_clean_bad, "attacked": n_met_bad}}


# ----------------------------------------------------------- calibration
def calibration_bins(logits: Tensor, y: Tensor, n_bins: int = 15) -> Dict[str, List[float]]:
    """Equal-width confidence bins of the top-class softmax probability:
    per bin its mean confidence, accuracy and count."""
    n_bins = int_arg("n_bins", n_bins, 1)
    logits = _logits("logits", logits)
    _labels("y", y, logits.shape[0])
    p = torch.softmax(logits.float(), 1)
    conf, pred = p.max(1)
    correct = (pred == y.to(pred.device)).float()
    idx = (conf * n_bins).long().clamp(max=n_bins - 1)
    cnt = torch.zeros(n_bins).index_add_(0, idx.cpu(), torch.ones(len(y)))
    sc = torch.zeros(n_bins).index_add_(0, idx.cpu(), conf.cpu())
    sa = torch.zeros(n_bins).index_add_(0, idx.cpu(), correct.cpu())
    safe = cnt.clamp_min(1)
    return {"edges": torch.linspace(0, 1, n_bins + 1).tolist(), "count": cnt.tolist(),
            "confidence": (sc / safe).tolist(), "accuracy": (sa / safe).tolist()}


def expected_calibration_error(logits: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b| over equal-width confidence bins
    (Guo et al. 2017)."""
    bins = calibration_bins(logits, y, n_bins)
    n = sum(bins["count"])
    if n == 0:
        return float("nan")
    return float(sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"],
                                                          bins["confidence"])))


def calibration_under_attack(model, x: Tensor, y: Tensor, x_adv: Tensor, n_bins: int = 15,
                             bs: int = 256, normalization=None) -> Dict[str, object]:
    """ECE and reliability-diagram bins on the clean and on the adversarial inputs."""
    _tensor("x", x)
    _tensor("x_adv", x_adv)
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv: expected the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    _labels("y", y, x.shape[0] if x.dim() else None)
    n_bins = int_arg("n_bins", n_bins, 1)
    out = {}
    bad = {}
    for name, inp in (("clean", x), ("adversarial", x_adv)):
        z = predict_logits(model, inp, bs, normalization)
        yy = y.to(z.device)
        # a row with non-finite logits has no confidence to bin: it counts as wrong in the
        # accuracy and is left out of the bins, the ECE and the mean confidence
        fin = finite_rows(z) if z.dim() == 2 else torch.ones(len(z), dtype=torch.bool)
        zf, yf = z[fin], yy[fin]
        bad[name] = int((~fin).sum())
        out[name] = {"ece": expected_calibration_error(zf, yf, n_bins), "bins": calibration_bins(zf, yf, n_bins),
                     "accuracy": accuracy(predictions(z) == yy) if len(z) else float("nan"),
                     "mean_confidence": torch.softmax(zf, 1).max(1).values.mean().item() if len(zf) else float("nan"),
                     "nonfinite": bad[name]}
    _warn_nonfinite("calibration_under_attack", {"clean inputs": bad["clean"],
                                                 "adversarial inputs": bad["adversarial"]}, len(x),
                    "those rows count as misclassified and are left out of the ECE and the bins")
    return out


# -------------------------------------------------------------- transfer
def transfer_robustness(surrogate, target, x: Tensor, y: Tensor, eps: float, norm: str = "Linf",
                        attack: Optional[Attack] = None, steps: int = 100, seed: int = 0,
                        bs: int = 256, target_normalization=None, **attack_kwargs) -> Dict[str, float]:
    """Black-box transfer: adversarial examples crafted on ``surrogate`` (APGD-CE by
    default, or ``attack`` built on the surrogate), evaluated on ``target``.

    Returns the target's clean and transfer-robust accuracy (a point counts as robust if
    the target classifies its transferred example correctly), the surrogate's own
    white-box robust accuracy, and the transfer success rate on target-correct points.
    ``attack_kwargs`` (``normalization``, ``lower``/``upper``, ...) configure the attack on
    the surrogate; ``target_normalization=(mean, std)`` if the target expects normalized
    input (both models get pixel-space x)."""
    bs = int_arg("bs", bs, 1)
    atk = attack if attack is not None else APGD(surrogate, norm, eps, steps, 1, seed, "ce", **attack_kwargs)
    s_norm = None if atk._mean is None else (atk._mean.tolist(), atk._std.tolist())
    if getattr(atk, "_io_normalized", False):
        raise ValueError("attack: expected an attack on pixel-space input (normalization=(mean, std)), "
                         "got one under set_normalization_used")
    x_adv = torch.cat([atk(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]) if len(x) else x
    zt_clean = predict_logits(target, x, bs, target_normalization)
    zt_adv = predict_logits(target, x_adv, bs, target_normalization)
    zs_adv = predict_logits(surrogate, x_adv, bs, s_norm)
    yy = y.to(zt_clean.device)
    # non-finite logits are no prediction: never correct (so never robust), never fooled
    clean_ok = predictions(zt_clean) == yy
    pred_adv = predictions(zt_adv)
    adv_ok = pred_adv == yy
    fooled = clean_ok & (pred_adv >= 0) & ~adv_ok
    bad = {"target clean inputs": int((~finite_rows(zt_clean)).sum()) if len(x) else 0,
           "target transferred inputs": int((~finite_rows(zt_adv)).sum()) if len(x) else 0,
           "surrogate adversarial inputs": int((~finite_rows(zs_adv)).sum()) if len(x) else 0}
    _warn_nonfinite("transfer_robustness", bad, len(x),
                    "such a point counts as neither correct (so not robust) nor fooled")
    return {"target_clean_accuracy": accuracy(clean_ok),
            "transfer_robust_accuracy": accuracy(clean_ok & adv_ok),
            "surrogate_robust_accuracy": accuracy(predictions(zs_adv) == yy),
            "transfer_success_rate": (fooled.sum() / clean_ok.sum().clamp_min(1)).item(),
            "eps": float(eps), "norm": norm,
            "nonfinite": {"target_clean": bad["target clean inputs"],
                          "target_transferred": bad["target transferred inputs"],
                          "surrogate_adversarial": bad["surrogate adversarial inputs"]}}
