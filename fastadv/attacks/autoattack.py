"""AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square in sequence, worst case per point.

The reference package's (fra31/auto-attack) constructor, defaults, sub-attack
objects (``apgd``, ``apgd_targeted``, ``fab``, ``square``) and the tweaks people make
to them, its versions, its verbose log (also written to ``log_path``) and its
``run_standard_evaluation(x, y, bs=...)``. Each attack runs only on the points all
previous attacks left robust (the active set across attacks); inside an attack,
targets and restarts are one batch and fooled points stop. Every success is
re-checked (a forward pass and the norm bound) before a point is counted as
non-robust. ``state_path`` makes a long run resumable: progress is saved after
every chunk and an interrupted run picks up where it stopped — only with the same
data, the same model weights and the same settings (else it starts over and warns
which changed). A plain callable model has no weights to fingerprint: its
``state_path`` is ignored, with a warning.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._groups import finite_rows, lp_norm, norm_name, warn_nonfinite
from .apgd import APGD, APGDT
from .base import Attack, AttackResult, NonFiniteLogitsError, int_arg, model_context, module_of
from .fab import FAB
from .square import Square

__all__ = ["AutoAttack", "ATTACK_NAMES"]

ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
_VERSIONS = ("standard", "plus", "rand", "custom")
# which sub-attack object runs each attack, and the class it must be
_SOURCE = {"apgd-ce": "apgd", "apgd-dlr": "apgd", "apgd-t": "apgd_targeted", "fab": "fab",
           "fab-t": "fab", "square": "square"}
_CLASS = {"apgd": APGD, "apgd_targeted": APGDT, "fab": FAB, "square": Square}


class _Logger:
    """The reference's logger: every line is printed and, with ``log_path``, appended to that file."""

    def __init__(self, log_path):
        self.log_path = log_path

    def log(self, line: str) -> None:
        print(line, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")


class _CleanAccuracy(float):
    """The clean accuracy of the last run (nan before one) that is also the reference's
    method: ``aa.clean_accuracy`` compares and prints as a float, ``aa.clean_accuracy(x, y,
    bs=250)`` computes the accuracy of ``x``."""

    def __new__(cls, value: float, owner: "AutoAttack"):
        obj = super().__new__(cls, value)
        obj._owner = owner
        return obj

    def __call__(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250) -> float:
        return self._owner._accuracy_of(x_orig, y_orig, bs)


class AutoAttack(Attack):
    """AutoAttack with the reference's constructor, versions, sub-attacks and defaults.

    ``AutoAttack(model, norm='Linf', eps=.3, seed=None, verbose=True, attacks_to_run=[],
    version='standard', is_tf_model=False, device='cuda', log_path=None)`` as in
    fra31/auto-attack, positions included (``seed`` is the 4th; torchattacks'
    ``AutoAttack`` has ``version`` there: pass it by name).

    The attacks are the objects ``apgd`` (APGD-CE and APGD-DLR), ``apgd_targeted``
    (APGD-T), ``fab`` (FAB, and FAB-T with one restart) and ``square``, built with the
    reference's budgets (100 iterations, APGD and FAB with 5 restarts, Square with 5000
    queries, ``p_init=.8`` and no schedule rescaling) and set by ``set_version``:

    - "standard": apgd-ce, apgd-t (9 targets), fab-t (9 targets), square, one restart
      each; L1: apgd-ce with 5 restarts and apgd-t with 5 targets, both with
      ``use_largereps`` (the 3ε → 2ε → ε schedule), and fab-t (no L1 Square here);
    - "plus": apgd-ce and apgd-dlr (5 restarts), fab (5 restarts), square, apgd-t, fab-t;
    - "rand": apgd-ce and apgd-dlr with EOT over 20 samples (randomised defences);
    - "custom": ``attacks_to_run`` (names from ``ATTACK_NAMES``), given here or set
      afterwards, run with the objects as they stand.

    Tweaks take effect as in the reference: ``aa.apgd.n_restarts``, ``.n_iter``,
    ``aa.apgd_targeted.n_target_classes``, ``aa.fab.n_restarts``, ``.n_target_classes``,
    ``aa.square.n_queries``, ``.p_init``, ``aa.attacks_to_run = [...]``, ``aa.seed``; they
    are checked when a run starts. The threat model is the AutoAttack's own ``eps`` (also
    ``epsilon``) and ``norm``: the sub-attacks run with those.

    ``device``: an ``nn.Module`` is attacked on the device of its parameters, whatever
    ``device`` says (the inputs are copied there, ``x_adv`` comes back on the inputs'
    device, the model is not moved); with ``verbose`` a ``device`` that differs is
    reported. A callable without parameters runs on ``device``, or, when that is CUDA
    and no GPU is present (the reference's default on a CPU machine), on the inputs'
    device. ``is_tf_model=True`` is refused: there is no TensorFlow path.

    fastadv's own options, by name: ``steps`` (100) and ``n_queries`` (5000) set the
    iterations and queries of the sub-attacks at construction; ``checks`` runs the
    gradient-masking self-checks of ``fastadv.eval.masking`` that need no extra attacks
    and warns (logged too, with ``verbose``); ``n_classes`` (torchattacks' argument)
    warns if the model disagrees. After a run, ``last_result`` holds the AttackResult
    with per-attack details, ``robust_accuracy`` and ``clean_accuracy`` the accuracies
    (``clean_accuracy(x, y, bs)`` is also the reference's method)."""

    def __init__(self, model, norm: str = "Linf", eps: float = .3, seed: Optional[int] = None,
                 verbose: bool = True, attacks_to_run: Sequence[str] = [], version: str = "standard",
                 is_tf_model: bool = False, device="cuda", log_path=None, *,
                 n_classes: Optional[int] = None, steps: int = 100, n_queries: int = 5000,
                 checks: bool = True, **kwargs):
        if isinstance(seed, str):
            hint = (f" (torchattacks' AutoAttack takes version 4th; here the order is the reference's, "
                    f"(model, norm, eps, seed, verbose, attacks_to_run, version, ...): pass "
                    f"version={seed!r} by name)") if seed in _VERSIONS else ""
            raise TypeError(f"seed: expected an int or None, got the string {seed!r}{hint}")
        super().__init__(kwargs.pop("name", "AutoAttack"), model, eps=eps, seed=seed, **kwargs)
        self.norm = norm_name(norm)
        self._check_budget()   # before the sub-attacks, so that the error names AutoAttack
        if version not in _VERSIONS:
            raise ValueError(f"version: expected one of {_VERSIONS}, got {version!r}")
        if self._flag("is_tf_model", is_tf_model):
            raise ValueError("is_tf_model: TensorFlow models are not supported; pass a PyTorch module "
                             "(or a callable on torch tensors) that returns the logits")
        self.is_tf_model = False
        self.device = device
        self._device = _parse_device(device)
        if log_path is not None and not isinstance(log_path, (str, os.PathLike)):
            raise TypeError(f"log_path: expected a path or None, got {type(log_path).__name__}")
        self.logger = _Logger(log_path)
        if n_classes is not None:
            n_classes = int_arg("n_classes", n_classes, 2)
        self.n_classes = n_classes
        self.verbose = self._flag("verbose", verbose)
        steps = int_arg("steps", steps, 1)
        self._n_queries = int_arg("n_queries", n_queries, 1)  # what set_version gives Square
        self.checks = self._flag("checks", checks)
        self._kwargs = dict(kwargs)
        if isinstance(attacks_to_run, str):
            raise TypeError(f"attacks_to_run: expected a list of names from {ATTACK_NAMES}, "
                            f"got the string {attacks_to_run!r}")
        attacks_to_run = list(attacks_to_run)
        if version != "custom" and attacks_to_run:
            raise ValueError("attacks_to_run: would be overridden by version "
                             f"{version!r}; use version='custom' to choose the attacks")
        if attacks_to_run:
            self._check_names(attacks_to_run)
        self.attacks_to_run = attacks_to_run
        self._clean_acc = float("nan")
        self.last_result: Optional[AttackResult] = None
        self.robust_accuracy: Optional[float] = None
        # the reference's sub-attacks and budgets, before set_version adjusts them
        kw = dict(self._common(), seed=seed)
        self.apgd = APGD(model, self.norm, self.eps, steps, 5, loss="ce", eot_iter=1, rho=.75, **kw)
        self.apgd_targeted = APGDT(model, self.norm, self.eps, steps, 1, eot_iter=1, rho=.75,
                                   n_target_classes=9, **kw)
        self.fab = FAB(model, self.norm, self.eps, steps, 5, n_target_classes=9, **kw)
        # Square has no L1 form here: the object exists (the reference has it), but it is
        # refused by name whenever it would run under L1 (built as L∞, it must not take the
        # L1 radius for an L∞ budget: the budget is the L1 one, checked above)
        l1 = self.norm == "L1"
        self.square = Square(model, "Linf" if l1 else self.norm, self.eps, self._n_queries, 1,
                             p_init=.8, resc_schedule=False, **(dict(kw, allow_large_eps=True) if l1 else kw))
        self.square.norm = self.norm
        self.square.allow_large_eps = self.allow_large_eps
        self.version = version
        if version != "custom":
            self.set_version(version)

    # ------------------------------------------------- the reference's API
    @property
    def epsilon(self) -> float:
        """The reference's name for ``eps``."""
        return self.eps

    @epsilon.setter
    def epsilon(self, v) -> None:
        self.eps = self._nonneg("epsilon", v)

    @property
    def log_path(self):
        return self.logger.log_path

    @log_path.setter
    def log_path(self, v) -> None:
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"log_path: expected a path or None, got {type(v).__name__}")
        self.logger.log_path = v

    @property
    def clean_accuracy(self) -> _CleanAccuracy:
        """The last run's clean accuracy (a float); called, the reference's
        ``clean_accuracy(x_orig, y_orig, bs=250)``."""
        return _CleanAccuracy(self._clean_acc, self)

    @clean_accuracy.setter
    def clean_accuracy(self, v) -> None:
        self._clean_acc = float(v)

    @property
    def steps(self) -> int:
        """APGD's iterations (fastadv's name; ``steps=`` at construction sets APGD, APGD-T and FAB)."""
        return self.apgd.steps

    @steps.setter
    def steps(self, v) -> None:
        v = int_arg("steps", v, 1)
        for atk in (self.apgd, self.apgd_targeted, self.fab):
            atk.steps = v

    @property
    def n_queries(self) -> int:
        """Square's query budget (``square.n_queries``)."""
        return self.square.n_queries

    @n_queries.setter
    def n_queries(self, v) -> None:
        self.square.n_queries = int_arg("n_queries", v, 1)

    def get_logits(self, x: Tensor) -> Tensor:
        """The model's logits on ``x`` (inputs as you pass them to the attack: normalized under
        ``set_normalization_used``), with autograd as usual."""
        if getattr(self, "_io_normalized", False):
            m, s = self._channel_stats(x.float())
            x = x * s + m
        return self.logits(x, fp32=True)

    def get_seed(self):
        """The reference's: the seed, or the time when there is none."""
        return time.time() if self.seed is None else self.seed

    def set_version(self, version: str = "standard") -> None:
        """The reference's versions: the attack list and the sub-attacks' restarts, targets
        and queries (only what the reference sets; other tweaks stay)."""
        if version not in ("standard", "plus", "rand"):
            raise ValueError(f"version: expected 'standard', 'plus' or 'rand', got {version!r}")
        if self.verbose:
            self.logger.log(f"setting parameters for {version} version")
        self.version = version
        if version == "standard":
            if self.norm == "L1":
                self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t"]
                self.apgd.use_largereps = True
                self.apgd_targeted.use_largereps = True
                self.apgd.n_restarts = 5
                self.apgd_targeted.n_target_classes = 5
            else:
                self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]
                self.apgd.n_restarts = 1
                self.apgd_targeted.n_target_classes = 9
            self.fab.n_restarts = 1
            self.apgd_targeted.n_restarts = 1
            self.fab.n_target_classes = 9
            self.square.n_queries = self._n_queries
        elif version == "plus":
            self.attacks_to_run = ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
            if self.norm == "L1":  # no L1 Square
                self.attacks_to_run.remove("square")
            self.apgd.n_restarts = 5
            self.fab.n_restarts = 5
            self.apgd_targeted.n_restarts = 1
            self.fab.n_target_classes = 9
            self.apgd_targeted.n_target_classes = 9
            self.square.n_queries = self._n_queries
        else:
            self.attacks_to_run = ["apgd-ce", "apgd-dlr"]
            self.apgd.n_restarts = 1
            self.apgd.eot_iter = 20

    # ------------------------------------------------------------ attacks
    def _common(self) -> Dict[str, object]:
        kw = dict(self._kwargs)
        kw.update(lower=self.lower, upper=self.upper, amp=self.amp, channels_last=self.channels_last,
                  backend=self.backend, model_mode=self.model_mode, check_inputs=False)
        return kw

    def _check_names(self, names) -> List[str]:
        """``attacks_to_run`` checked: a non-empty list of known names, each once, none that
        the norm rules out."""
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise TypeError(f"attacks_to_run: expected a list of names from {ATTACK_NAMES}, "
                            f"got {type(names).__name__} {names!r}")
        names = list(names)
        if not names:
            raise ValueError("attacks_to_run: no attacks to run; with version='custom' set "
                             f"adversary.attacks_to_run to a list of names from {ATTACK_NAMES}")
        bad = [a for a in names if a not in ATTACK_NAMES]
        if bad:
            raise ValueError(f"attacks_to_run: unknown attacks {bad}; expected names from {ATTACK_NAMES}")
        dup = sorted({a for a in names if names.count(a) > 1})
        if dup:
            raise ValueError(f"attacks_to_run: each attack at most once, got {dup} more than once")
        if self.norm == "L1" and "square" in names:
            raise ValueError("attacks_to_run: Square is not available for norm 'L1' here; use "
                             "apgd-ce, apgd-dlr, apgd-t, fab or fab-t")
        return names

    def build_attack(self, name: str) -> Attack:
        """The attack behind one of ``ATTACK_NAMES`` as it will run: a copy of its sub-attack
        object (``apgd``, ``apgd_targeted``, ``fab``, ``square``) with this AutoAttack's eps,
        norm, box and precision, and what the reference sets per attack (the loss of
        apgd-ce/apgd-dlr, FAB-T's targets and single restart). The settings are checked."""
        if name not in ATTACK_NAMES:
            raise ValueError(f"attacks_to_run: unknown attack {name!r}; expected names from {ATTACK_NAMES}")
        src_name = _SOURCE[name]
        src = getattr(self, src_name)
        cls = _CLASS[src_name]
        if not isinstance(src, cls):
            raise TypeError(f"{src_name}: expected a fastadv {cls.__name__}, got {type(src).__name__}")
        atk = copy.copy(src)
        atk.__dict__.pop("_norm_cache", None)
        for k, v in self._common().items():
            if k in ("lower", "upper", "amp", "channels_last", "backend", "model_mode", "check_inputs"):
                setattr(atk, k, v)
        atk.model, atk.eps, atk.norm = self.model, self.eps, self.norm
        # untargeted, silently (set_mode_default prints torchattacks' message)
        atk.targeted, atk._target_mode, atk._target_fn = False, "default", None
        atk._mean = atk._std = None
        atk._io_normalized = False
        if self._mean is not None:
            atk._set_model_normalization(self._mean.tolist(), self._std.tolist())  # pixel-space I/O inside
        if name in ("apgd-ce", "apgd-dlr"):
            atk.loss = "ce" if name == "apgd-ce" else "dlr"
        elif name == "fab":
            atk.multi_targeted = False
        elif name == "fab-t":
            # the reference runs FAB-T with one restart whatever fab.n_restarts says
            atk.multi_targeted, atk.n_restarts, atk.attack = True, 1, "FABT"
        _check_settings(atk, src_name, self.norm)
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
    def _config(self, atks: Dict[str, Attack]) -> Dict[str, str]:
        """Every setting that changes the result, by name: a state file saved under other
        values is not resumed (the names that differ are reported)."""
        norm = None if self._mean is None else (self._mean.tolist(), self._std.tolist(),
                                                 "normalized I/O" if self._io_normalized else "pixel I/O")
        # covered by the attributes above, or without effect on the result (a generator's
        # repr is its address: it would never match)
        covered = {"lower", "upper", "amp", "normalization", "model_mode", "generator", "backend",
                   "channels_last", "check_inputs", "allow_large_eps"}
        rest = sorted((k, v) for k, v in self._kwargs.items() if k not in covered)
        steps = {n: a.steps for n, a in atks.items() if n != "square"}
        queries = atks["square"].n_queries if "square" in atks else None
        others = {n: {k: v for k, v in _settings(a).items() if k not in ("steps", "n_queries")}
                  for n, a in atks.items()}
        return {"norm": self.norm, "eps": repr(self.eps), "version": self.version,
                "attacks_to_run": repr(list(atks)), "steps": repr(steps),
                "n_queries": repr(queries), "attack settings": repr(others),
                "n_classes": repr(self.n_classes),
                "normalization": repr(norm), "bounds": repr((self.lower, self.upper)),
                "amp": repr(self.amp), "seed": repr(self.seed), "model_mode": self.model_mode,
                "options": repr(rest), "model": str(model_signature(self.model))}

    def _fingerprint(self, x: Tensor, y: Tensor, atks: Dict[str, Attack]) -> Tuple[str, Dict[str, str]]:
        """(one hash of the data and every setting, the per-name parts it hashes)."""
        cfg = dict(self._config(atks), data=data_signature(x, y))
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
    def _log(self, line: str) -> None:
        if self.verbose:
            self.logger.log(line)

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator,
                bs: Optional[int] = None, state_path: Optional[str] = None,
                progress=None) -> AttackResult:
        if target is not None:
            raise ValueError("AutoAttack is untargeted: its targeted parts (apgd-t, fab-t) pick their targets")
        b = x.shape[0]
        dev = x.device
        names = self._check_names(self.attacks_to_run)
        atks = {n: self.build_attack(n) for n in names}
        self._log(f"using {self.version} version including {', '.join(names)}")
        self._log(self._settings_line(atks, bs, dev))
        with torch.no_grad():
            if b:
                self._check_classes(int(self.logits(x[:1], fp32=True).shape[1]))
        if self.checks and b:
            for c in _model_checks(self, x[: min(b, 64)], y[: min(b, 64)]):
                self._log(f"Warning: [{c.name}] {c.reason}")
        with torch.no_grad():
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
            fp, cfg = self._fingerprint(x, y, atks)
            state = _load_state(state_path, fp, cfg, state, self._log)
        robust = state["robust"].to(dev)
        attack_of = state["attack_of"].to(dev)
        self._log(f"initial accuracy: {clean.float().mean().item() if b else float('nan'):.2%}")
        x_adv = x.clone()
        if state["adv_idx"].numel():
            x_adv.index_copy_(0, state["adv_idx"].to(dev), state["adv_x"].to(dev, x.dtype))
        steps = torch.zeros(b, dtype=torch.long, device=dev)
        nonfinite = torch.zeros(b, dtype=torch.bool, device=dev)
        chunk = bs or b or 1
        work: Dict[str, int] = {}
        for k, name in enumerate(names):
            atk = atks[name]
            tried = state["tried"][k].to(dev)
            todo = (robust & ~tried).nonzero().squeeze(1)
            if not bool(robust.any()):
                break  # as the reference: nothing left to attack
            n_batches = -(-todo.numel() // chunk)
            if progress is not None and todo.numel():
                progress.start(name, int(todo.numel()))
            t0 = time.perf_counter()
            for i, s in enumerate(range(0, todo.numel(), chunk)):
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
                self._log(f"{name} - {i + 1}/{n_batches} - {int(ok.sum())} out of {pts.numel()} "
                          "successfully perturbed")
                if state_path:
                    state["time"][k] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    state["tried"][k] = tried.cpu()
                    _save_state(state_path, fp, cfg, robust, attack_of, state, x_adv, clean)
                if progress is not None:
                    progress.advance(name, int(pts.numel()))
            state["time"][k] += time.perf_counter() - t0
            state["tried"][k] = tried.cpu()
            self._log(f"robust accuracy after {name.upper()}: {robust.float().mean().item():.2%} "
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
            c = _square_check(res)
            if c is not None and c.fired:
                self._log(f"Warning: [{c.name}] {c.reason}")
        self.last_result = res
        self.clean_accuracy = clean.float().mean().item() if b else float("nan")
        self.robust_accuracy = robust.float().mean().item() if b else float("nan")
        return res

    def _settings_line(self, atks: Dict[str, Attack], bs: Optional[int], dev: torch.device) -> str:
        """One line with the threat model and what each attack will spend, so that a tweak
        can be seen to have taken effect."""
        head = (f"settings: norm {self.norm}, eps {self.eps:.5g}, seed {self.seed}, device {dev}, "
                f"bs {bs if bs else 'all'}")
        parts = []
        for n, a in atks.items():
            s = _settings(a)
            if n == "square":
                d = f"{s['n_queries']} queries, p_init {s['p_init']:g}, {s['n_restarts']} restart(s)"
            else:
                d = f"{s['steps']} iterations, {s['n_restarts']} restart(s)"
                if "n_target_classes" in s and (n == "apgd-t" or n == "fab-t"):
                    d += f", {s['n_target_classes']} target classes"
                if s.get("eot_iter", 1) > 1:
                    d += f", eot_iter {s['eot_iter']}"
                if s.get("use_largereps"):
                    d += ", use_largereps"
            parts.append(f"{n}: {d}")
        return head + "; " + "; ".join(parts)

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

    def _run_device(self, x: Tensor) -> torch.device:
        """Where the run happens: on the model's parameters' device; for a callable without
        any, on ``device`` when it is present, else on the inputs' device."""
        module = module_of(self.model)
        first = None
        if module is not None:
            first = next(itertools.chain(module.parameters(), module.buffers()), None)
        want = self._device
        if first is not None:
            dev = first.device
            if want is not None and _usable(want) and not _same_device(want, dev):
                self._log(f"device: running on {dev}, where the model's parameters are (device="
                          f"{self.device!r} moves nothing: move the model there to run there)")
            return dev
        if want is None or not _usable(want):
            return x.device
        return want

    def _evaluate(self, x_orig: Tensor, y_orig: Tensor, bs: Optional[int], state_path: Optional[str],
                  progress, return_labels: bool):
        """The whole run: (x_adv on x_orig's device, the AttackResult, the labels or None)."""
        self._refuse_inference_mode()
        if not isinstance(x_orig, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x_orig).__name__}")
        if not isinstance(y_orig, Tensor):
            raise TypeError(f"y: expected a torch.Tensor of labels, got {type(y_orig).__name__}")
        progress = _Progress.of(progress)
        dev = self._run_device(x_orig)
        x_run, y_run = x_orig.to(dev), y_orig.to(dev)
        xf, y = self._prepare(self._from_user(x_run), y_run)  # normalized input under set_normalization_used
        labels = None
        with model_context(self.model, self.model_mode, xf.device):
            with torch.no_grad():
                z = self.logits(xf[: min(len(xf), 16)]).float()
            if len(xf):
                self._check_logits(z, y[: z.shape[0]], None)
            self._check_depends_on_x(xf)
            gen = self.make_generator(xf.device)
            res = self._attack(xf, y, None, gen, bs=bs, state_path=state_path, progress=progress)
            # the user's dtype: rounded back into the ball, flags of the tensor returned
            x_adv = self._result_to_user(res, xf, x_run, y, None, bs)
            res.x_adv = x_adv
            # after the rounding above, which may take a success back; imported here: attacks
            # do not depend on fastadv.eval at import time
            from ..eval.metrics import autoattack_summary
            res.extra["summary"] = autoattack_summary(res.extra)
            warn_nonfinite(self, res)
            if self.verbose and len(xf):
                xa = self._from_user(x_adv).float()
                d = lp_norm(xa - xf, self.norm)
                self._log(f"max {self.norm} perturbation: {d.max().item():.5f}, nan in tensor: "
                          f"{int(torch.isnan(x_adv).sum())}, max: {xa.max().item():.5f}, "
                          f"min: {xa.min().item():.5f}")
            self._log(f"robust accuracy: {self.robust_accuracy:.2%}")
            if return_labels:
                with torch.no_grad():
                    labels = _predict(self, self._from_user(x_adv).to(torch.float32), bs)
        res.x_adv = x_adv
        x_out = x_adv.to(x_orig.device)
        return x_out, res, (None if labels is None else labels.to(y_orig.device))

    def run(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> AttackResult:
        """The whole evaluation on ``(x, y)`` in one chunk (``atk(x, y)``, torchattacks' call)."""
        if target is not None or self.targeted:
            raise ValueError("AutoAttack is untargeted: its targeted parts (apgd-t, fab-t) pick their targets")
        return self._evaluate(x, y, None, None, None, False)[1]

    def run_standard_evaluation(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250,
                                return_labels: bool = False, state_path: Optional[str] = None,
                                progress=None):
        """The adversarial batch (worst case over the attacks), as in the reference package;
        with ``return_labels``, ``(x_adv, labels)``: the model's predictions on it.

        ``bs`` is the number of points per chunk (memory grows with the target and
        restart count inside each attack); ``state_path`` saves progress so an
        interrupted run resumes; ``progress(attack_name, n_points, total)`` is called once
        as each attack starts (``n_points`` 0) and after every chunk with the points that
        chunk attacked; ``total`` is the points the attack will attack (those still robust
        when it starts, less those it tried before a resume). A callback taking two arguments, ``progress(attack_name,
        n_points)``, is called after every chunk only, as before. ``last_result.extra
        ["summary"]`` is ``fastadv.eval.autoattack_summary`` of the run."""
        if bs is not None:
            bs = int_arg("bs", bs, 1)
        x_adv, _, labels = self._evaluate(x_orig, y_orig, bs, state_path, progress, return_labels)
        return (x_adv, labels) if return_labels else x_adv

    def run_standard_evaluation_individual(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250,
                                           return_labels: bool = False) -> Dict[str, object]:
        """Each attack on its own on every clean-correct point: ``{name: x_adv}`` (``{name:
        (x_adv, labels)}`` with ``return_labels``), the accuracies in ``individual_accuracy``."""
        names = self._check_names(self.attacks_to_run)
        self._log(f"using {self.version} version including {', '.join(names)}")
        out: Dict[str, object] = {}
        accs: Dict[str, float] = {}
        keep, verbose = self.attacks_to_run, self.verbose
        self.verbose = False
        try:
            for name in names:
                t0 = time.perf_counter()
                self.attacks_to_run = [name]
                x_adv, labels = self.run_standard_evaluation(x_orig, y_orig, bs=bs, return_labels=True)
                out[name] = (x_adv, labels) if return_labels else x_adv
                accs[name] = self.robust_accuracy
                if verbose:
                    space = "\t \t" if name == "fab" else "\t"
                    self.logger.log(f"robust accuracy by {name.upper()} {space} {accs[name]:.2%} \t "
                                    f"(time attack: {time.perf_counter() - t0:.1f} s)")
        finally:
            self.attacks_to_run, self.verbose = keep, verbose
        self.individual_accuracy = accs
        return out

    def _accuracy_of(self, x_orig: Tensor, y_orig: Tensor, bs: int = 250) -> float:
        """The reference's ``clean_accuracy``: the accuracy of the model on ``x_orig``."""
        if bs is not None:
            bs = int_arg("bs", bs, 1)
        if not isinstance(x_orig, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x_orig).__name__}")
        dev = self._run_device(x_orig)
        xf, y = self._prepare(self._from_user(x_orig.to(dev)), y_orig.to(dev) if isinstance(y_orig, Tensor)
                              else y_orig)
        with model_context(self.model, self.model_mode, xf.device), torch.no_grad():
            acc = (_predict(self, xf, bs) == y).float().mean().item() if len(xf) else float("nan")
        self._log(f"clean accuracy: {acc:.2%}")
        return acc


class _Progress:
    """The user's ``progress`` callback, called with the total when it takes three arguments."""

    def __init__(self, fn, with_total: bool):
        self.fn, self.with_total = fn, with_total
        self.totals: Dict[str, int] = {}

    @classmethod
    def of(cls, fn) -> Optional["_Progress"]:
        if fn is None:
            return None
        if not callable(fn):
            raise TypeError(f"progress: expected a callable progress(attack, n_points[, total]) or None, "
                            f"got {type(fn).__name__}")
        try:
            inspect.signature(fn).bind("apgd-ce", 0, 0)
        except TypeError:     # (attack, n_points): the two-argument form
            return cls(fn, False)
        except ValueError:    # no signature to read (some builtins): the form every callback takes
            return cls(fn, False)
        return cls(fn, True)

    def start(self, name: str, total: int) -> None:
        self.totals[name] = total
        if self.with_total:
            self.fn(name, 0, total)

    def advance(self, name: str, n: int) -> None:
        if self.with_total:
            self.fn(name, n, self.totals.get(name))
        else:
            self.fn(name, n)


def _parse_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"device: expected a device such as 'cuda', 'cuda:0' or 'cpu', "
                        f"got {type(device).__name__} {device!r}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device: expected a device such as 'cuda', 'cuda:0' or 'cpu', got {device!r} "
                         f"({exc})") from None


def _usable(dev: torch.device) -> bool:
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    try:
        torch.empty(0, device=dev)
        return True
    except (RuntimeError, AssertionError):
        return False


def _same_device(want: torch.device, dev: torch.device) -> bool:
    return want.type == dev.type and (want.index is None or want.index == dev.index)


def _settings(atk: Attack) -> Dict[str, object]:
    """The settings of a sub-attack that change what it finds."""
    keys = ("steps", "n_restarts", "n_target_classes", "eot_iter", "rho", "loss", "use_largereps",
            "alpha_max", "eta", "beta", "multi_targeted", "n_queries", "p_init", "rescale_schedule",
            "square_loss", "early_stop", "resample_unchanged")
    return {k: getattr(atk, k) for k in keys if hasattr(atk, k)}


def _check_settings(atk: Attack, owner: str, norm: str) -> None:
    """The values a user may have assigned to a sub-attack, checked with their names
    (``apgd.n_restarts``) before anything runs."""
    if isinstance(atk, Square):
        int_arg(f"{owner}.n_queries", atk.n_queries, 1)
        p = Attack._real(f"{owner}.p_init", atk.p_init)
        if not 0 < p <= 1:
            raise ValueError(f"{owner}.p_init: expected a value in (0, 1], got {p}")
    else:
        int_arg(f"{owner}.n_iter", atk.steps, 1)
    int_arg(f"{owner}.n_restarts", atk.n_restarts, 1)
    if isinstance(atk, (APGDT, FAB)):
        int_arg(f"{owner}.n_target_classes", atk.n_target_classes, 1)
    if isinstance(atk, APGD):
        int_arg(f"{owner}.eot_iter", atk.eot_iter, 1)
        Attack._flag(f"{owner}.use_largereps", atk.use_largereps)
        if atk.use_largereps and norm != "L1":
            raise ValueError(f"{owner}.use_largereps: only for norm 'L1' (the eps schedule of L1-APGD), "
                             f"got norm {norm!r}")


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
            raise NonFiniteLogitsError(f"model: returned non-finite logits (NaN or inf) on the clean input "
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


def _load_state(path: str, fp: str, cfg: Dict[str, str], default: dict, log) -> dict:
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
    done = int(blob["tried"].any(1).sum())
    log(f"AutoAttack: resuming from {path} ({done} attack(s) started)")
    return blob


def _model_checks(atk: Attack, x: Tensor, y: Tensor) -> list:
    """The masking checks that fired (each also warned)."""
    try:
        from ..eval import masking
    except ImportError:  # pragma: no cover - eval is part of the package
        return []
    return [c for c in masking.run_model_checks(atk, x, y, warn=True) if c.fired]


def _square_check(res: AttackResult):
    try:
        from ..eval import masking
    except ImportError:  # pragma: no cover
        return None
    return masking.square_beats_whitebox(res, warn=True)
