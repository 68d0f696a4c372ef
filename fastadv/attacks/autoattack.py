"""AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square in sequence, worst case per point.

The call shape of the reference package (``AutoAttack(model, norm, eps,
version).run_standard_evaluation(x, y, bs=...)``) and its attack sets and
defaults. Each attack runs only on the points all previous attacks left robust
(the active set across attacks); inside an attack, targets and restarts are one
batch and fooled points stop. Every success is re-checked (a forward pass and the
norm bound) before a point is counted as non-robust. ``state_path`` makes a long
run resumable: progress is saved after every chunk and an interrupted run picks
up where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._groups import layout_like, lp_norm, norm_name
from .apgd import APGD, APGDT
from .base import Attack, AttackResult, model_context
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
        self.n_classes = n_classes
        self.verbose = bool(verbose)
        self.steps = int(steps)
        self.n_queries = int(n_queries)
        self.checks = bool(checks)
        self._kwargs = dict(kwargs)
        if version == "custom":
            if not attacks_to_run:
                raise ValueError("attacks_to_run: version 'custom' needs a list of attacks "
                                 f"from {ATTACK_NAMES}")
            self.attacks_to_run = list(attacks_to_run)
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

    # -------------------------------------------------------------- state
    @staticmethod
    def _fingerprint(x: Tensor, y: Tensor, extra: str) -> str:
        h = hashlib.sha1()
        h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(y.detach().cpu().numpy().tobytes())
        h.update(extra.encode())
        return h.hexdigest()

    def _config(self) -> str:
        return (f"{self.norm}|{self.eps!r}|{self.version}|{self.attacks_to_run}|{self.steps}|"
                f"{self.n_queries}|{model_signature(self.model)}")

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
            pred = _predict(self, x, bs)
        clean = pred == y
        state = {"robust": clean.clone(), "attack_of": torch.where(clean, -1, -2).long(),
                 "tried": torch.zeros(len(names), b, dtype=torch.bool), "time": [0.0] * len(names),
                 "adv_idx": torch.zeros(0, dtype=torch.long), "adv_x": x.new_zeros((0,) + x.shape[1:])}
        fp = None
        if state_path:
            fp = self._fingerprint(x, y, self._config())
            state = _load_state(state_path, fp, state, self.verbose)
        robust = state["robust"].to(dev)
        attack_of = state["attack_of"].to(dev)
        x_adv = x.clone()
        if state["adv_idx"].numel():
            x_adv.index_copy_(0, state["adv_idx"].to(dev), state["adv_x"].to(dev, x.dtype))
        steps = torch.zeros(b, dtype=torch.long, device=dev)
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
                work[name] = work.get(name, 0) + int(res.steps.sum())
                tried[pts] = True
                if state_path:
                    state["time"][k] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    state["tried"][k] = tried.cpu()
                    _save_state(state_path, fp, robust, attack_of, state, x_adv, clean)
                if progress is not None:
                    progress(name, int(pts.numel()))
            state["time"][k] += time.perf_counter() - t0
            state["tried"][k] = tried.cpu()
            if self.verbose:
                print(f"robust accuracy after {name.upper()}: {robust.float().mean().item():.2%} "
                      f"(total time {sum(state['time'][:k + 1]):.1f} s)")
        if state_path:
            _save_state(state_path, fp, robust, attack_of, state, x_adv, clean)
        per_attack = {n: (attack_of == k) for k, n in enumerate(names)}
        res = AttackResult(x_adv, ~robust, torch.zeros(b, device=dev), steps, extra={
            "clean": clean, "robust": robust, "attack_of": attack_of, "per_attack": per_attack,
            "attacks": list(names), "time": dict(zip(names, state["time"])), "norm": self.norm,
            # rows × iterations per attack (APGD/FAB: gradient steps; Square: queries)
            "work": work,
            "eps": self.eps})
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
            pred = _fp32_logits(self, xa).argmax(1)
        dist = lp_norm(xa - xs, self.norm)
        tol = 1e-5 * max(1.0, self.eps)
        inside = (dist <= self.eps + tol) & (xa.flatten(1).amin(1) >= self.lower - 1e-6) & (
            xa.flatten(1).amax(1) <= self.upper + 1e-6)
        return ok & (pred != ys) & inside

    # ------------------------------------------------- the reference's API
    def run_standard_evaluation(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250,
                                return_labels: bool = False, state_path: Optional[str] = None,
                                progress=None):
        """The adversarial batch (worst case over the attacks), as in the reference package.

        ``bs`` is the number of points per chunk (memory grows with the target and
        restart count inside each attack); ``state_path`` saves progress so an
        interrupted run resumes; ``progress(attack_name, n_points_done)`` is called
        after every chunk."""
        xf, y = self._prepare(self._from_user(x_orig), y_orig)  # normalized input under set_normalization_used
        with model_context(self.model, self.model_mode, xf.device):
            with torch.no_grad():
                z = self.logits(xf[: min(len(xf), 16)]).float()
            if len(xf):
                self._check_logits(z, y[: z.shape[0]], None)
            gen = self.make_generator(xf.device)
            res = self._attack(xf, y, None, gen, bs=bs, state_path=state_path, progress=progress)
        x_adv = layout_like(self._to_user(res.x_adv, x_orig).to(x_orig.dtype), x_orig)
        res.x_adv = x_adv
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
def model_signature(model) -> str:
    """A cheap fingerprint of a model's weights (shapes and two moments per tensor), so a
    state file is never resumed with another model."""
    if not isinstance(model, nn.Module):
        return type(model).__name__
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in list(model.state_dict().items()):
            if not torch.is_tensor(t):
                continue
            tf = t.detach().double() if t.is_floating_point() else t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{float(tf.sum()):.10e}{float((tf * tf).sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _predict(atk: Attack, x: Tensor, bs: Optional[int]) -> Tensor:
    step = bs or max(len(x), 1)
    out = [_fp32_logits(atk, x[i:i + step]).argmax(1) for i in range(0, len(x), step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def _fp32_logits(atk: Attack, x: Tensor) -> Tensor:
    """Logits without autocast: decisions about success are taken in exact fp32."""
    try:
        return atk.logits(x, fp32=True).float()
    except TypeError:  # a base class without the fp32 switch
        return atk.logits(x).float()


def _save_state(path: str, fp: str, robust: Tensor, attack_of: Tensor, state: dict, x_adv: Tensor,
                clean: Tensor) -> None:
    idx = (~robust & clean).nonzero().squeeze(1)
    blob = {"fingerprint": fp, "robust": robust.cpu(), "attack_of": attack_of.cpu(),
            "tried": state["tried"].cpu(), "time": list(state["time"]),
            "adv_idx": idx.cpu(), "adv_x": x_adv.index_select(0, idx).cpu()}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _load_state(path: str, fp: str, default: dict, verbose: bool) -> dict:
    if not os.path.exists(path):
        return default
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as exc:  # a truncated file: start over, say so
        warnings.warn(f"AutoAttack: could not read the state file {path} ({exc}); starting over")
        return default
    if blob.get("fingerprint") != fp:
        warnings.warn(f"AutoAttack: the state file {path} belongs to other data or settings; starting over")
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
