"""Projected gradient descent, L∞ (``PGD``) and L2 (``PGDL2``), drop-in for torchattacks'.

Same constructor names, order and defaults as ``torchattacks.PGD`` / ``PGDL2``; the extra
options are keywords. The step is one fused op (``fastadv.ops.linf_step_`` /
``l2_step_``); the loop is ``fastadv.attacks._engine``: restarts as one batch, the
last (torchattacks') or best iterate per sample, early stop, amp, CUDA graphs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from . import _engine
from ._groups import chunked_loss_and_grad, forward_rows
from .base import Attack, AttackResult, int_arg

__all__ = ["PGD", "PGDL2", "pgd", "pgd_l2"]


class _IterativeAttack(Attack):
    """The shared machinery of FGSM, PGD and PGD-L2 (``norm`` says which step)."""

    norm = "linf"
    _success_is_misclassified = True

    def __init__(self, name: str, model: nn.Module, eps: float, alpha: float, steps: int,
                 random_start: bool, *, restarts: int = 1, loss: str = "ce",
                 targeted: bool = False, early_stop: bool = False, amp=None,
                 channels_last: Union[str, bool] = "auto", cuda_graph: bool = False,
                 backend: Optional[str] = None, generator: Optional[torch.Generator] = None,
                 seed: Optional[int] = None,
                 normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 lower: float = 0.0, upper: float = 1.0, keep: Optional[str] = None,
                 max_batch: Optional[int] = None, model_mode: str = "eval",
                 check_inputs: bool = True, allow_large_eps: bool = False):
        super().__init__(name, model, eps=eps, lower=lower, upper=upper, loss=loss,
                         targeted=targeted, amp=amp, channels_last=channels_last,
                         backend=backend, generator=generator, seed=seed,
                         normalization=normalization, model_mode=model_mode,
                         check_inputs=check_inputs, allow_large_eps=allow_large_eps)
        self.alpha = self._nonneg("alpha", alpha)
        self.steps = int_arg("steps", steps, 0)
        self.random_start = self._flag("random_start", random_start)
        self.restarts = int_arg("restarts", restarts, 1)
        if self.restarts > 1 and not self.random_start:
            raise ValueError("restarts: more than one restart needs random_start=True "
                             "(without it every restart is the same run)")
        if keep not in (None, "best", "last"):
            raise ValueError(f"keep: expected 'best', 'last' or None, got {keep!r}")
        self.early_stop = self._flag("early_stop", early_stop)
        # torchattacks returns the last iterate; early stop needs the best (see PGD's docstring)
        self.keep = keep if keep is not None else self._option_default("keep", None)
        if self.early_stop and keep == "last":
            raise ValueError("early_stop: needs keep='best' (a stopped sample keeps its "
                             "successful iterate, not the last one)")
        self.cuda_graph = self._flag("cuda_graph", cuda_graph)
        if max_batch is not None:
            max_batch = int_arg("max_batch", max_batch, 1)
        self.max_batch = max_batch
        self._graphs: dict = {}

    def _option_default(self, name: str, default):
        if name == "keep":
            return "best" if self.early_stop else "last"
        return default

    # ---------------------------------------------------------------- step
    def _step(self, x: Tensor, x_nat: Tensor, g: Tensor) -> None:
        fn = ops.linf_step_ if self.norm == "linf" else ops.l2_step_
        fn(x, x_nat, g, self.alpha, self.eps, self.lower, self.upper, backend=self.backend,
           _check_values=False)

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        """torchattacks' start: ``x + U(-eps, eps)`` per element, clamped to the box. The noise
        is drawn in NCHW order whatever the attack's layout, as torchattacks draws it, so a
        generator seeded like torch's global one gives torchattacks' very start."""
        if not self.random_start or self.eps == 0.0:
            return x_nat.clone()
        noise = torch.empty(x_nat.shape, dtype=torch.float32, device=x_nat.device)
        noise.uniform_(-self.eps, self.eps, generator=gen)
        x0 = (x_nat + noise).clamp_(self.lower, self.upper)
        return x0.contiguous(memory_format=_engine.memory_format(x_nat))

    def _clean_logits(self, xf: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        """Without a random start the first step's gradient pass is at x itself: in exact
        fp32 (no amp), untargeted, one restart, its logits are the clean logits, so that
        pass runs here and the loop starts from its gradient (FGSM: one forward fewer of
        three). Otherwise the plain clean forward."""
        self.__dict__.pop("_first_pass", None)
        if (target is None and not self.targeted and self.amp is None and self.steps >= 1
                and self.restarts == 1 and (not self.random_start or self.eps == 0.0)
                and not self.cuda_graph and xf.shape[0] > 0):
            try:
                loss, z, g = chunked_loss_and_grad(self, xf, y, None, None, forward_rows(self, xf, y, None))
            except (IndexError, RuntimeError):
                # a label out of range fails inside the loss before run() could check it:
                # give the clear error the other paths give (else the loss's own error stands)
                z = super()._clean_logits(xf, y, target)
                self._check_logits(z, y, None)
                raise
            self._first_pass = (loss, z, g)
            return z
        return super()._clean_logits(xf, y, target)

    # ---------------------------------------------------------------- loop
    def _loop(self, loop: _engine.StepLoop, x_nat: Tensor, y: Tensor, t: Optional[Tensor],
              x0: Tensor, samples: int, first=None) -> _engine.LoopOutput:
        if self.cuda_graph:
            why = None
            if x_nat.device.type != "cuda":
                why = "the input is not on a CUDA device"
            elif self.early_stop:
                why = "early_stop=True changes the batch shape during the run"
            if why is None:
                key = _engine.graph_key(self, x_nat, t, (self.alpha, self.eps, self.lower,
                                                          self.upper, self.steps, self.keep,
                                                          self.norm, self.backend))
                graphed = self._graphs.get(key)
                if graphed is None:
                    if len(self._graphs) >= 4:   # a graph holds its memory pool: keep few
                        self._graphs.pop(next(iter(self._graphs)))
                    graphed = _engine.GraphedLoop(loop, x_nat, y, t, x0, samples)
                    self._graphs[key] = graphed
                return graphed.run(x_nat, y, t, x0)
            _engine.warn_once(self, "graph:" + why,
                              f"fastadv: cuda_graph=True ignored ({why}); running eagerly")
        return loop.run(x_nat, y, t, x0, samples, first=first)

    def _exact(self, x: Tensor, y: Tensor, target: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Loss and success of ``x`` from a float32 forward (amp's verdicts are approximate)."""
        with torch.no_grad():
            z = self.exact_logits(x, y)
        return self.attack_loss(z, y, target).float(), self.is_success(z, y, target)

    def _success_of(self, z: Tensor, y: Tensor, target: Optional[Tensor], res: AttackResult,
                    x_adv: Tensor, xf: Tensor) -> Tensor:
        # the loss reported is the loss at the returned point too
        res.loss = self.attack_loss(z, y, target).float()
        return self.is_success(z, y, target)

    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor],
                gen: torch.Generator) -> AttackResult:
        b = x.shape[0]
        dev = x.device
        # the first step's (loss, logits, gradient) at x, when run() computed them
        first_pass = self.__dict__.pop("_first_pass", None)
        z = self.clean_logits
        if z is None:  # called outside run(): recompute
            with torch.no_grad():
                z = self.exact_logits(x, y)
        best = self.keep == "best"
        # the clean point is a candidate too: a misclassified sample is already a success
        res_x = x.clone()
        if best:
            res_loss = self.attack_loss(z, y, target).float()
            res_succ = self.is_success(z, y, target)
        else:
            res_loss = torch.full((b,), float("-inf"), device=dev)
            res_succ = torch.zeros(b, dtype=torch.bool, device=dev)
        res_steps = torch.zeros(b, dtype=torch.long, device=dev)
        res_restart = torch.full((b,), -1, dtype=torch.long, device=dev)
        res_bad = torch.zeros(b, dtype=torch.bool, device=dev)
        if self.cuda_graph and dev.type == "cuda" and not self.max_batch:
            # chunk sizes come from free memory, which each captured graph's pool lowers:
            # fix them per input shape so a second call replays instead of re-capturing
            sizes = self.__dict__.setdefault("_graph_rows", {})
            key = (tuple(x.shape), x.stride(), self.restarts, target is None)
            if key not in sizes:
                sizes[key] = _engine.auto_max_rows(self, x, y, target, self.restarts * b)
            max_rows = sizes[key]
        else:
            max_rows = self.max_batch or _engine.auto_max_rows(self, x, y, target, self.restarts * b)
        pass_rows = None
        if self.early_stop and dev.type == "cpu" and not self.max_batch:
            # Early stop on a CPU: one active set over many cache-sized passes, so the rows
            # left late in the run are batched together instead of trickling through each
            # chunk in turn (a pass of a few rows costs more per row); state stays < ~1 GB.
            budget = max(max_rows, (2 ** 30) // max(1, 8 * 4 * x[0].numel()))
            pass_rows, max_rows = max_rows, min(self.restarts * b, budget)
        loop = _engine.StepLoop(self, self._step, self.steps, keep=self.keep,
                                early_stop=self.early_stop, pass_rows=pass_rows)

        r = 0
        while r < self.restarts and b:
            if self.early_stop and self.amp is not None and r > 0:
                # which samples are done is judged in float32 (see the end)
                res_loss, res_succ = self._exact(res_x, y, target)
            todo = (~res_succ).nonzero().squeeze(1) if self.early_stop else None
            n = b if todo is None else int(todo.numel())
            if n == 0:
                break
            nr, per_chunk = _engine.restart_blocks(n, self.restarts - r, max_rows)
            # One restart in chunks: draw the whole batch's start at once, so the chunking (a
            # CPU cache size) does not change which numbers each sample gets.
            starts = None
            if nr == 1 and per_chunk < n:
                starts = self._start(x if todo is None else x[todo], gen)
            for s in range(0, n, per_chunk):
                if todo is None and per_chunk >= n:
                    idx = None
                    xs, ys, ts = x, y, target
                else:
                    idx = (todo if todo is not None else torch.arange(b, device=dev))[s:s + per_chunk]
                    xs, ys, ts = x[idx], y[idx], None if target is None else target[idx]
                m = xs.shape[0]
                xn = _engine.tile(xs, nr)
                yn = _engine.tile(ys, nr)
                tn = None if ts is None else _engine.tile(ts, nr)
                first = first_pass  # set only for one restart, untargeted (see _clean_logits)
                if first is not None and idx is not None:
                    first = tuple(v.index_select(0, idx) for v in first_pass)
                if starts is None:
                    x0 = self._start(xn, gen)
                else:
                    x0 = starts[s:s + per_chunk]
                out = self._loop(loop, xn, yn, tn, x0, m, first)
                cx, closs, csucc, cr = _engine.pick_restart(out.x, out.loss, out.success, nr)
                took = _engine.merge_best(res_x, res_loss, res_succ, idx, cx, closs, csucc)
                spent = out.steps.view(nr, m).sum(0)
                bad = out.nonfinite.view(nr, m).any(0)
                if idx is None:
                    res_bad |= bad
                    res_steps += spent
                    res_restart = torch.where(took, cr + r, res_restart)
                else:
                    res_bad.index_copy_(0, idx, res_bad[idx] | bad)
                    res_steps.index_add_(0, idx, spent)
                    res_restart.index_copy_(0, idx, torch.where(took, cr + r, res_restart[idx]))
            r += nr

        if not best:
            # keep="last" returns the clean point where no iterate had finite logits: its
            # success and loss are then the clean point's (a misclassified one stays a success)
            never = res_restart < 0
            res_succ = torch.where(never, self.is_success(z, y, target), res_succ)
            res_loss = torch.where(never, self.attack_loss(z, y, target).float(), res_loss)
        if self.amp is not None:
            # the iterates were judged on low-precision logits: report exact figures
            res_loss, res_succ = self._exact(res_x, y, target)
        return AttackResult(res_x, res_succ, res_loss, res_steps,
                            extra={"restart": res_restart, "target": target, "nonfinite": res_bad})


class PGD(_IterativeAttack):
    """L∞ PGD (Madry et al. 2018), drop-in for ``torchattacks.PGD``.

    ``PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True, *, restarts=1,
    loss="ce"|"cw"|"dlr", targeted=False, early_stop=False, amp=None|"bf16"|"fp16",
    channels_last="auto", cuda_graph=False, backend=None, generator=None, seed=None,
    normalization=None, lower=0., upper=1., keep=None|"last"|"best", max_batch=None,
    model_mode="eval")``

    ``atk(x, y)`` returns the adversarial batch; ``atk.run(x, y)`` an ``AttackResult``.
    ``keep="last"`` (the default) returns each sample's last iterate, as torchattacks'
    PGD does: with the same start the two give the same batch, up to float rounding.
    ``keep="best"`` returns the best iterate instead (the first that fools the model, else
    the one of highest loss, the clean point included): never weaker, and what an
    evaluation wants; ``early_stop=True`` implies it (``keep=None`` resolves to it then).
    Over ``restarts`` each sample keeps its worst case.
    ``max_batch`` caps the rows per forward. By default restarts run as one ``restarts·B``
    batch where memory allows (CUDA), and on CPU the batch runs in chunks whose saved
    activations fit the last-level cache (same math per sample, up to 2x faster there);
    a model with a module in training mode is never split below its batch. Inputs live
    in ``[lower, upper]``; with ``normalization=(mean, std)`` the model sees
    ``(x - mean) / std``.
    """

    norm = "linf"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, random_start: bool = True, **options):
        super().__init__("PGD", model, eps, alpha, steps, random_start, **options)


class PGDL2(_IterativeAttack):
    """L2 PGD, drop-in for ``torchattacks.PGDL2`` (same options as ``PGD``).

    The random start is torchattacks' (and Madry et al.'s code's): a uniformly random
    direction at a radius uniform in ``[0, eps]``. A start uniform in the ball's volume
    (``fastadv.ops.random_init``) lies on the sphere in high dimension, and measured
    weaker with few steps. ``eps_for_division`` is accepted for compatibility; the fused
    ``l2_step`` op floors the gradient norm at 1e-12 instead of adding 1e-10 to it."""

    norm = "l2"

    def _start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        if not self.random_start or self.eps == 0.0:
            return x_nat.clone()
        n = x_nat.shape[0]
        # torchattacks' draws and arithmetic, in its order (NCHW noise, then the radii)
        d = torch.empty(x_nat.shape, dtype=torch.float32, device=x_nat.device).normal_(generator=gen)
        norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        r = torch.empty(n, dtype=torch.float32, device=x_nat.device).uniform_(0, 1, generator=gen)
        d.mul_(_engine.per_sample(r / norm * self.eps, d.dim()))
        x0 = (x_nat + d).clamp_(self.lower, self.upper)
        return x0.contiguous(memory_format=_engine.memory_format(x_nat))

    def __init__(self, model: nn.Module, eps: float = 1.0, alpha: float = 0.2, steps: int = 10,
                 random_start: bool = True, eps_for_division: float = 1e-10, **options):
        super().__init__("PGDL2", model, eps, alpha, steps, random_start, **options)
        self.eps_for_division = self._nonneg("eps_for_division", eps_for_division)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, alpha: float = 2 / 255,
        steps: int = 10, random_start: bool = True, *, target: Optional[Tensor] = None,
        **options) -> Tensor:
    """``PGD(model, eps, alpha, steps, random_start, **options)(x, y, target)``: the adversarial batch."""
    return PGD(model, eps, alpha, steps, random_start, **options)(x, y, target)


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float = 1.0, alpha: float = 0.2,
           steps: int = 10, random_start: bool = True, *, target: Optional[Tensor] = None,
           **options) -> Tensor:
    """``PGDL2(model, eps, alpha, steps, random_start, **options)(x, y, target)``."""
    return PGDL2(model, eps, alpha, steps, random_start, **options)(x, y, target)
