"""AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square in sequence, worst case per point.

The call shape of the reference package (``AutoAttack(model, norm, eps,
version).run_standard_evaluation(x, y, bs=...)``) and its attack sets and
defaults. Each attack runs only on the points all previous attacks left robust
(the active set across attacks); inside an attack, targets and restarts are one
batch and fooled points stop. Every success is re-checked (a forward pass and the
norm bound) before a point is counted as non-robust. ``state_path`` makes a long
run resumable: progress is saved after every chunk and an interrupted run picks
up where it stopped — only with the same data, the same model weights and the same
settings (else it starts over and warns which changed). A plain callable model has
no weights to fingerprint: its ``state_path`` is ignored, with a warning.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._groups import finite_rows, lp_norm, norm_name, warn_nonfinite
from .apgd import APGD, APGDT
from .base import Attack, AttackResult, int_arg, model_context, module_of
from .fab import FAB
from .square import Square

__all__ = ["AutoAttack", "ATTACK_NAMES"]

ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
_VERSIONS = ("standard", "plus", "rand", "custom")


class AutoAttack(Attack):
    """AutoAttack with the reference's versions and defaults.

    version "standard": apgd-ce, apgd-t (9 targets), fab-t (9 targets), square (5000
    queries), one restart each (L1: apgd-ce with 5 restarts and apgd-t, both with
    ``use_largereps``, the 3ε → 2ε → ε schedule of the reference);
    "plus": apgd-ce and apgd-dlr (5 restarts), fab (5 restarts), square, apgd-t, fab-t;
    "rand": apgd-ce and apgd-dlr with EOT over 20 samples (randomised defences);
    "custom": ``attacks_to_run``, a subset of ``ATTACK_NAMES``.

    ``steps`` (100) and ``n_queries`` (5000) may be lowered for quick looks; the
    defaults are the reference's. ``checks`` runs the gradient-masking self-checks
    of ``fastadv.eval.masking`` that need no extra attacks (randomness, softmax
    output, zero gradients, Square beating the white-box attacks) and warns.
    After a run, ``last_result`` holds the AttackResult with per-attack details."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, version: str = "standard",
                 n_classes: Optional[int] = None, seed: Optional[int] = None, verbose: bool = False,
                 attacks_to_run: Sequence[str] = (), *, steps: int = 100, n_queries: int = 5000,
                 checks: bool = True, **kwargs):
        super().__init__(kwargs.pop("name", "AutoAttack"), model, eps=eps, seed=seed, **kwargs)
        self.norm = norm_name(norm)
        if version not in _VERSIONS:
            raise ValueError(f"version: expected one of {_VERSIONS}, got {version!r}")
        self.version = version
        if n_classes is not None:
            n_classes = int_arg("n_classes", n_classes, 2)
        self.n_classes = n_classes
        self.verbose = self._flag("verbose", verbose)
        self.steps = int_arg("steps", steps, 1)
        self.n_queries = int_arg("n_queries", n_queries, 1)
        self.checks = self._flag("checks", checks)
        self._kwargs = dict(kwargs)
        if isinstance(attacks_to_run, str):
            raise TypeError(f"attacks_to_run: expected a list of names from {ATTACK_NAMES}, "
                            f"got the string {attacks_to_run!r}")
        if version == "custom":
            if not attacks_to_run:
                raise ValueError("attacks_to_run: version 'custom' needs a list of attacks "
                                 f"from {ATTACK_NAMES}")
            self.attacks_to_run = list(attacks_to_run)
            dup = sorted({a for a in self.attacks_to_run if self.attacks_to_run.count(a) > 1})
            if dup:
                raise ValueError(f"attacks_to_run: each attack at most once, got {dup} more than once")
        elif attacks_to_run:
            raise ValueError("attacks_to_run: only used with version='custom'")
        else:
            self.attacks_to_run = self._version_attacks()
        bad = [a for a in self.attacks_to_run if a not in ATTACK_NAMES]
        if bad:
            raise ValueError(f"attacks_to_run: unknown attacks {bad}; expected names from {ATTACK_NAMES}")
        if self.norm == "L1" and "square" in self.attacks_to_run:
            raise ValueError("attacks_to_run: Square is not available for norm 'L1' (as in the "
                             "reference); use apgd-ce, apgd-dlr, apgd-t, fab or fab-t")
        self.last_result: Optional[AttackResult] = None
        self.clean_accuracy: Optional[float] = None
        self.robust_accuracy: Optional[float] = None

    def _version_attacks(self) -> List[str]:
        if self.version == "standard":
            return ["apgd-ce", "apgd-t"] if self.norm == "L1" else ["apgd-ce", "apgd-t", "fab-t", "square"]
        if self.version == "plus":
            return ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
        return ["apgd-ce", "apgd-dlr"]  # rand

    # ------------------------------------------------------------ attacks
    def _common(self) -> Dict[str, object]:
        kw = dict(self._kwargs)
        kw.update(lower=self.lower, upper=self.upper, amp=self.amp, channels_last=self.channels_last,
                  backend=self.backend, model_mode=self.model_mode, check_inputs=False)
        return kw

    def build_attack(self, name: str) -> Attack:
        """The configured attack behind one of ``ATTACK_NAMES`` (with this run's settings)."""
        kw = self._common()
        plus = self.version == "plus"
        rand = self.version == "rand"
        restarts = 5 if plus else 1
        eot = 20 if rand else 1
        # the reference's standard L1 setting: the 3ε → 2ε → ε schedule of L1-APGD
        l1_std = self.norm == "L1" and self.version == "standard"
        if name in ("apgd-ce", "apgd-dlr"):
            r = 5 if (plus or (l1_std and name == "apgd-ce")) else 1
            atk = APGD(self.model, self.norm, self.eps, self.steps, r, None,
                       "ce" if name == "apgd-ce" else "dlr", eot, use_largereps=l1_std, **kw)
        elif name == "apgd-t":
            atk = APGDT(self.model, self.norm, self.eps, self.steps, 1, None, eot, n_target_classes=9,
                        use_largereps=l1_std, **kw)
        elif name == "fab":
            atk = FAB(self.model, self.norm, self.eps, self.steps, restarts, **kw)
        elif name == "fab-t":
            atk = FAB(self.model, self.norm, self.eps, self.steps, 1, multi_targeted=True,
                      n_target_classes=9, name="FABT", **kw)
        else:
            atk = Square(self.model, self.norm, self.eps, self.n_queries, 1, **kw)
        if self._mean is not None:
            atk._set_model_normalization(self._mean.tolist(), self._std.tolist())  # pixel-space I/O inside
        return atk

    @property
    def uses_gradients(self) -> bool:
        """Square alone needs no gradient; any other attack in the list does."""
        return any(a != "square" for a in self.attacks_to_run)

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        """After rounding to the user's dtype: a point counts as fooled only if the returned
        tensor fools the model; the robust flags and accuracy follow."""
        ex = res.extra
        fooled = (z.argmax(1) != y) & finite_rows(z) & ex["clean"]
        back = ~fooled & ~ex["robust"] & ex["clean"]   # fooled in float32, not after rounding
        if bool(back.any()):
            ex["robust"] = ex["robust"] | back
            ex["attack_of"] = torch.where(back, torch.full_like(ex["attack_of"], -1), ex["attack_of"])
            ex["per_attack"] = {n: (ex["attack_of"] == k) for k, n in enumerate(ex["attacks"])}
        b = y.shape[0]
        self.robust_accuracy = ex["robust"].float().mean().item() if b else float("nan")
        return ~ex["robust"]

    # -------------------------------------------------------------- state
    def _config(self) -> Dict[str, str]:
        """Every setting that changes the result, by name: a state file saved under other
        values is not resumed (the names that differ are reported)."""
        norm = None if self._mean is None else (self._mean.tolist(), self._std.tolist(),
                                                 "normalized I/O" if self._io_normalized else "pixel I/O")
        # covered by the attributes above, or without effect on the result (a generator's
        # repr is its address: it would never match)
        covered = {"lower", "upper", "amp", "normalization", "model_mode", "generator", "backend",
                   "channels_last", "check_inputs"}
        rest = sorted((k, v) for k, v in self._kwargs.items() if k not in covered)
        return {"norm": self.norm, "eps": repr(self.eps), "version": self.version,
                "attacks_to_run": repr(list(self.attacks_to_run)), "steps": repr(self.steps),
                "n_queries": repr(self.n_queries), "n_classes": repr(self.n_classes),
                "normalization": repr(norm), "bounds": repr((self.lower, self.upper)),
                "amp": repr(self.amp), "seed": repr(self.seed), "model_mode": self.model_mode,
                "options": repr(rest), "model": str(model_signature(self.model))}

    def _fingerprint(self, x: Tensor, y: Tensor) -> Tuple[str, Dict[str, str]]:
        """(one hash of the data and every setting, the per-name parts it hashes)."""
        cfg = dict(self._config(), data=data_signature(x, y))
        h = hashlib.sha1()
        for k in sorted(cfg):
            h.update(f"{k}={cfg[k]};".encode())
        return h.hexdigest(), cfg

    def _check_classes(self, n_cls: int) -> None:
        """Fail before any attack runs when the model's class count rules one out."""
        if n_cls < 2:
            raise ValueError(f"model: expected logits for at least 2 classes, got {n_cls}")
        need = {"apgd-dlr": 3, "apgd-t": 4}  # the DLR loss and its targeted form
        short = [a for a in self.attacks_to_run if n_cls < need.get(a, 0)]
        if not short:
            return
        rest = [a for a in self.attacks_to_run if a not in short] or ["apgd-ce"]
        what = " and ".join(f"{a} (needs >= {need[a]} classes)" for a in short)
        raise ValueError(f"attacks_to_run: {what} cannot attack a model with {n_cls} classes: "
                         f"the DLR loss is undefined there. Use AutoAttack(..., version='custom', "
                         f"attacks_to_run={rest}) instead")

    # ---------------------------------------------------------------- run
    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator,
                bs: Optional[int] = None, state_path: Optional[str] = None,
                progress=None) -> AttackResult:
        if target is not None:
            raise ValueError("AutoAttack is untargeted: its targeted parts (apgd-t, fab-t) pick their targets")
        b = x.shape[0]
        dev = x.device
        names = self.attacks_to_run
        with torch.no_grad():
            if b:
                self._check_classes(int(self.logits(x[:1], fp32=True).shape[1]))
            pred = _predict(self, x, bs, clean=True)
        clean = pred == y
        state = {"robust": clean.clone(), "attack_of": torch.where(clean, -1, -2).long(),
                 "tried": torch.zeros(len(names), b, dtype=torch.bool), "time": [0.0] * len(names),
                 "adv_idx": torch.zeros(0, dtype=torch.long), "adv_x": x.new_zeros((0,) + x.shape[1:])}
        fp, cfg = None, None
        if state_path and module_of(self.model) is None:
            warnings.warn(f"AutoAttack: state_path={state_path!r} ignored, running from scratch: the model "
                          "is a plain callable, whose weights cannot be fingerprinted, so a saved state "
                          "could belong to another model (pass an nn.Module to resume)", stacklevel=3)
            state_path = None
        if state_path:
            fp, cfg = self._fingerprint(x, y)
            state = _load_state(state_path, fp, cfg, state, self.verbose)
        robust = state["robust"].to(dev)
        attack_of = state["attack_of"].to(dev)
        x_adv = x.clone()
        if state["adv_idx"].numel():
            x_adv.index_copy_(0, state["adv_idx"].to(dev), state["adv_x"].to(dev, x.dtype))
        steps = torch.zeros(b, dtype=torch.long, device=dev)
        nonfinite = torch.zeros(b, dtype=torch.bool, device=dev)
        if self.checks and b:
            _model_checks(self, x[: min(b, 64)], y[: min(b, 64)])
        chunk = bs or b or 1
        work: Dict[str, int] = {}
        for k, name in enumerate(names):
            atk = self.build_attack(name)
            tried = state["tried"][k].to(dev)
            todo = (robust & ~tried).nonzero().squeeze(1)
            t0 = time.perf_counter()
            for s in range(0, todo.numel(), chunk):
                pts = todo[s:s + chunk]
                res = atk._attack(x.index_select(0, pts), y.index_select(0, pts), None, gen)
                ok = self._verify(x.index_select(0, pts), y.index_select(0, pts), res)
                hit = pts[ok]
                x_adv.index_copy_(0, hit, res.x_adv[ok].to(x_adv.dtype))
                robust[hit] = False
                attack_of[hit] = k
                steps.index_add_(0, pts, res.steps.to(steps.device))
                nf = res.extra.get("nonfinite")
                if nf is not None:
                    nonfinite.index_copy_(0, pts, nonfinite.index_select(0, pts) | nf.to(dev))
                work[name] = work.get(name, 0) + int(res.steps.sum())
                tried[pts] = True
                if state_path:
                    state["time"][k] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    state["tried"][k] = tried.cpu()
                    _save_state(state_path, fp, cfg, robust, attack_of, state, x_adv, clean)
                if progress is not None:
                    progress(name, int(pts.numel()))
            state["time"][k] += time.perf_counter() - t0
            state["tried"][k] = tried.cpu()
            if self.verbose:
                print(f"robust accuracy after {name.upper()}: {robust.float().mean().item():.2%} "
                      f"(total time {sum(state['time'][:k + 1]):.1f} s)")
        if state_path:
            _save_state(state_path, fp, cfg, robust, attack_of, state, x_adv, clean)
        per_attack = {n: (attack_of == k) for k, n in enumerate(names)}
        res = AttackResult(x_adv, ~robust, torch.zeros(b, device=dev), steps, extra={
            "clean": clean, "robust": robust, "attack_of": attack_of, "per_attack": per_attack,
            "attacks": list(names), "time": dict(zip(names, state["time"])), "norm": self.norm,
            # rows × iterations per attack (APGD/FAB: gradient steps; Square: queries)
            "work": work,
            "eps": self.eps,
            # points where a part met non-finite logits (never counted fooled on them)
            "nonfinite": nonfinite})
        if self.checks and "square" in names:
            _square_check(res)
        self.last_result = res
        self.clean_accuracy = clean.float().mean().item() if b else float("nan")
        self.robust_accuracy = robust.float().mean().item() if b else float("nan")
        return res

    def _verify(self, xs: Tensor, ys: Tensor, res: AttackResult) -> Tensor:
        """Successes that hold up: misclassified on a fresh forward pass, within eps and the box."""
        ok = res.success.clone()
        if not bool(ok.any()):
            return ok
        xa = res.x_adv.to(xs.dtype)
        with torch.no_grad():
            z = self.exact_logits(xa)
        pred = z.argmax(1)
        dist = lp_norm(xa - xs, self.norm)
        tol = 1e-5 * max(1.0, self.eps)
        inside = (dist <= self.eps + tol) & (xa.flatten(1).amin(1) >= self.lower - 1e-6) & (
            xa.flatten(1).amax(1) <= self.upper + 1e-6)
        return ok & (pred != ys) & finite_rows(z) & inside

    # ------------------------------------------------- the reference's API
    def run_standard_evaluation(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250,
                                return_labels: bool = False, state_path: Optional[str] = None,
                                progress=None):
        """The adversarial batch (worst case over the attacks), as in the reference package.

        ``bs`` is the number of points per chunk (memory grows with the target and
        restart count inside each attack); ``state_path`` saves progress so an
        interrupted run resumes; ``progress(attack_name, n_points_done)`` is called
        after every chunk."""
        if bs is not None:
            bs = int_arg("bs", bs, 1)
        xf, y = self._prepare(self._from_user(x_orig), y_orig)  # normalized input under set_normalization_used
        with model_context(self.model, self.model_mode, xf.device):
            with torch.no_grad():
                z = self.logits(xf[: min(len(xf), 16)]).float()
            if len(xf):
                self._check_logits(z, y[: z.shape[0]], None)
            self._check_depends_on_x(xf)
            gen = self.make_generator(xf.device)
            res = self._attack(xf, y, None, gen, bs=bs, state_path=state_path, progress=progress)
            # the user's dtype: rounded back into the ball, flags of the tensor returned
            x_adv = self._result_to_user(res, xf, x_orig, y, None, bs)
        res.x_adv = x_adv
        warn_nonfinite(self, res)
        if self.verbose:
            print(f"clean accuracy: {self.clean_accuracy:.2%}  robust accuracy: {self.robust_accuracy:.2%}")
        if return_labels:
            with model_context(self.model, self.model_mode, xf.device):
                with torch.no_grad():
                    labels = _predict(self, self._from_user(x_adv).to(torch.float32), bs)
            return x_adv, labels
        return x_adv

    def run_standard_evaluation_individual(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250,
                                           return_labels: bool = False) -> Dict[str, Tensor]:
        """Each attack on its own on every clean-correct point: {name: adversarial batch}."""
        out = {}
        keep = self.attacks_to_run
        accs = {}
        try:
            for name in keep:
                self.attacks_to_run = [name]
                out[name] = self.run_standard_evaluation(x_orig, y_orig, bs=bs, return_labels=return_labels)
                accs[name] = self.robust_accuracy
        finally:
            self.attacks_to_run = keep
        if self.verbose:
            for name, a in accs.items():
                print(f"robust accuracy by {name.upper()}: {a:.2%}")
        self.individual_accuracy = accs
        return out


# ------------------------------------------------------------------ helpers
def model_signature(model) -> Optional[str]:
    """A fingerprint of an ``nn.Module`` (or a bound method or partial of one): its module
    types and the exact bytes of every parameter and buffer, so a state file is never
    resumed with another model (None for a plain callable, which cannot be fingerprinted)."""
    module = module_of(model)
    if module is None:
        return None
    h = hashlib.sha1()
    if module is not model:   # net.forward vs net.features: which callable, too
        h.update(f"{type(model).__name__}:{getattr(model, '__name__', '')};".encode())
    model = module
    for name, mod in model.named_modules():
        h.update(f"{name}:{type(mod).__module__}.{type(mod).__qualname__};".encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if torch.is_tensor(t):
                h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
                _hash_tensor(h, t)
    return h.hexdigest()[:16]


def data_signature(x: Tensor, y: Tensor) -> str:
    """A hash of the exact values of a batch and its labels."""
    h = hashlib.sha1()
    for t in (x, y):
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        _hash_tensor(h, t)
    return h.hexdigest()[:16]


def _hash_tensor(h, t: Tensor) -> None:
    t = t.detach()
    if t.layout != torch.strided or t.is_quantized:  # rare: values through a dense float copy
        t = (t.dequantize() if t.is_quantized else t.to_dense()).float()
    raw = t.reshape(-1).contiguous().cpu().view(torch.uint8)
    h.update(raw.numpy())


def _predict(atk: Attack, x: Tensor, bs: Optional[int], clean: bool = False) -> Tensor:
    """Exact float32 predictions, ``bs`` rows at a time (none asked for an empty batch).
    ``clean``: the clean points, whose logits must be finite (an error names how many are not)."""
    if not len(x):
        return torch.zeros(0, dtype=torch.long, device=x.device)
    z = atk.exact_logits(x, None, bs)
    if clean:
        bad = int((~finite_rows(z)).sum())
        if bad:
            raise ValueError(f"model: returned non-finite logits (NaN or inf) on the clean input "
                             f"({bad} of {len(x)} points)")
    return z.argmax(1)


def _save_state(path: str, fp: str, cfg: Dict[str, str], robust: Tensor, attack_of: Tensor, state: dict,
                x_adv: Tensor, clean: Tensor) -> None:
    idx = (~robust & clean).nonzero().squeeze(1)
    blob = {"fingerprint": fp, "config": dict(cfg), "robust": robust.cpu(), "attack_of": attack_of.cpu(),
            "tried": state["tried"].cpu(), "time": list(state["time"]),
            "adv_idx": idx.cpu(), "adv_x": x_adv.index_select(0, idx).cpu()}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _load_state(path: str, fp: str, cfg: Dict[str, str], default: dict, verbose: bool) -> dict:
    if not os.path.exists(path):
        return default
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as exc:  # a truncated file: start over, say so
        warnings.warn(f"AutoAttack: could not read the state file {path} ({exc}); starting over")
        return default
    if blob.get("fingerprint") != fp:
        old = blob.get("config")
        why = ""
        if isinstance(old, dict):
            changed = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            why = f" ({', '.join(changed)} changed)" if changed else ""
        warnings.warn(f"AutoAttack: the state file {path} belongs to other data or settings{why}; "
                      "starting over")
        return default
    if verbose:
        done = int(blob["tried"].any(1).sum())
        print(f"AutoAttack: resuming from {path} ({done} attack(s) started)")
    return blob


def _model_checks(atk: Attack, x: Tensor, y: Tensor) -> None:
    try:
        from ..eval import masking
    except ImportError:  # pragma: no cover - eval is part of the package
        return
    masking.run_model_checks(atk, x, y, warn=True)


def _square_check(res: AttackResult) -> None:
    try:
        from ..eval import masking
    except ImportError:  # pragma: no cover
        return
    masking.square_beats_whitebox(res, warn=True)
