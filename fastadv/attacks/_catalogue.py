"""The step loop of the torchattacks-catalogue attacks whose update keeps per-row state.

Momentum (MI/NI/VMI/VNI/DI/TI-FGSM, UPGD), gradient variance (VMI/VNI), EOT sums, scale
copies (SI), input diversity (DI/TI) and the TPGD/Jitter/smoothed losses all fit one loop:
per step the attack computes an ascent direction from one or more model passes (and updates
its per-row state), then the fused ``linf_step_``/``l2_step_`` moves the iterate along its
sign. Everything else is PGD's engine (``_IterativeAttack``): restarts as one batch, the
best or last iterate per sample, early stop (the state rows leave with their sample), amp,
chunking to the cache or to memory, the model given back as found.

Random draws come from the attack's own generator in the order and shapes torchattacks
draws them from the global one, so on a CPU a run with ``seed=s`` (one restart, the batch
in one chunk: ``max_batch``) follows torchattacks' run after ``torch.manual_seed(s)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _engine
from ._groups import chunked_loss_and_grad, finite_rows
from .base import Attack, int_arg, module_of
from .pgd import _IterativeAttack

__all__ = ["CatalogueAttack", "StateLoop", "mean_abs_normalized", "Rows"]

# (loss [n], logits [n, C], input gradient) of one pass, as ``Attack.loss_and_grad`` returns
Pass = Tuple[Tensor, Tensor, Tensor]


def mean_abs_normalized(g: Tensor) -> Tensor:
    """``g / mean(|g|)`` per row, as the momentum attacks scale their gradients; a row whose
    gradient is all zero stays zero. (torchattacks divides 0 by 0 there: the momentum turns
    NaN for good, and the row stops moving on a CPU, where ``sign(NaN)`` is 0.)"""
    dims = tuple(range(1, g.dim()))
    m = g.abs().mean(dim=dims, keepdim=True)
    return torch.where(m > 0, g / m, torch.zeros((), dtype=g.dtype, device=g.device))


class Rows(dict):
    """The per-row tensors of the rows still attacked (``x``, ``x_nat``, ``y``, ``t`` and the
    attack's own state: momentum, variance, ...), gathered together when rows leave."""

    def gather(self, pos: Tensor) -> None:
        for k, v in list(self.items()):
            if isinstance(v, Tensor) and v.dim() > 0:
                self[k] = v[pos]


class StateLoop(_engine.StepLoop):
    """``StepLoop`` with per-row state and a direction the attack computes: per step
    ``d, z = attack._direction(rows, k, first)``, then ``step(x, x_nat, d)``.

    ``z`` are the logits at the iterate itself when the pass that made ``d`` was there
    (else None: then, only when the best iterate is tracked, one forward without grad
    gets them)."""

    def run(self, x_nat: Tensor, y: Tensor, target: Optional[Tensor], x0: Tensor,
            samples: int, first: Optional[Pass] = None) -> _engine.LoopOutput:
        atk = self.attack
        n, dev = x_nat.shape[0], x_nat.device
        best = _engine.BestIterate(x0) if self.keep == "best" else None
        active = _engine.ActiveSet(n, dev)
        row_steps = torch.zeros(n, dtype=torch.long, device=dev)
        bad = torch.zeros(n, dtype=torch.bool, device=dev)  # rows the model gave non-finite logits
        rows = Rows(x=x0.clone(), x_nat=x_nat, y=y, t=target)
        atk._init_state(rows, samples)
        budget = atk._copies_rows(x_nat, y, target, n)
        atk._pass_rows = self.pass_rows or budget
        seen: Optional[Tensor] = None
        done = 0
        for k in range(self.steps):
            d, z = atk._direction(rows, k, first if k == 0 else None)
            if k == 0:
                seen = d.ne(0).any()
            if z is not None:
                _engine._or_rows(bad, ~finite_rows(z), active.idx)
            if best is not None:
                if z is None:
                    with torch.no_grad():
                        z = atk.logits(rows["x"]).float()
                    _engine._or_rows(bad, ~finite_rows(z), active.idx)
                # failed rows are ranked by the attack loss (``loss=``), whatever loss the
                # direction came from (TPGD's KL, Jitter's noisy score); a row with
                # non-finite logits gets NaN, which never ranks above a finite loss
                loss = self._loss(atk, z, rows["y"], rows["t"])
                best.update(rows["x"], loss, atk.is_success(z, rows["y"], rows["t"]), active.idx)
            self.step(rows["x"], rows["x_nat"], d)
            done = k + 1
            if self.early_stop and best is not None and done < self.steps and active.due(done):
                self._check_grad(seen)
                seen = None
                keep = self._still_attacked(best, active, samples, y, target)
                pos, gone = active.shrink(keep)
                if pos is not None:
                    row_steps.index_fill_(0, gone, done)
                    rows.gather(pos)
                    if atk._coupled and not self.pass_rows:
                        atk._pass_rows = len(active) or 1
                    if len(active) == 0:
                        break
        xa = rows["x"]
        succ = loss = None
        if len(active):
            with torch.no_grad():
                z = atk.logits(xa).float()
            _engine._or_rows(bad, ~finite_rows(z), active.idx)
            loss = self._loss(atk, z, rows["y"], rows["t"])
            succ = atk.is_success(z, rows["y"], rows["t"])
            if best is not None:
                best.update(xa, loss, succ, active.idx)
            if active.idx is None:
                row_steps.fill_(done)
            else:
                row_steps.index_fill_(0, active.idx, done)
        self._check_grad(seen)
        if best is not None:
            return _engine.LoopOutput(best.x, best.loss, best.success, row_steps, bad)
        if succ is None:  # no steps on an empty batch
            with torch.no_grad():
                z = atk.logits(xa).float()
            bad |= ~finite_rows(z)
            loss = self._loss(atk, z, y, target)
            succ = atk.is_success(z, y, target)
        return _engine.LoopOutput(xa, loss, succ, row_steps, bad)

    @staticmethod
    def _loss(atk, z: Tensor, y: Tensor, t: Optional[Tensor]) -> Tensor:
        """The attack loss per row (float32), NaN where the logits are not finite."""
        return torch.where(finite_rows(z), atk.attack_loss(z, y, t).float(), float("nan"))


class CatalogueAttack(_IterativeAttack):
    """PGD's machinery with a ``StateLoop``: subclasses set up their state in
    ``_init_state(rows, samples)`` and compute ``_direction(rows, k, first)``.

    Class attributes:
    randomized        the run draws random numbers even without a random start (so that
                      restarts differ): restarts are allowed without ``random_start``
    plain_first_pass  the first step's pass is the plain loss gradient at x (then the pass
                      ``run`` makes for the clean logits is reused, as PGD does)
    """

    randomized = False
    plain_first_pass = False

    def __init__(self, name: str, model, eps: float, alpha: float, steps: int,
                 random_start: bool, *, restarts: int = 1, cuda_graph: bool = False, **options):
        if self._flag("cuda_graph", cuda_graph):
            raise ValueError(f"cuda_graph: not supported by {name} (its loop keeps per-row state "
                             f"and draws random numbers between passes); use cuda_graph=False")
        super().__init__(name, model, eps, alpha, steps, random_start, **options)
        self.restarts = int_arg("restarts", restarts, 1)
        if self.restarts > 1 and not (self.random_start or self.randomized):
            raise ValueError(f"restarts: more than one restart needs random_start=True (without it "
                             f"every restart of {name} is the same run)")
        self._gen: Optional[torch.Generator] = None
        self._cpu_gen: Optional[torch.Generator] = None
        self._pass_rows: Optional[int] = None
        self._coupled = False

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return (f"{type(self).__name__}(eps={self.eps:.6g}, alpha={self.alpha:.6g}, steps={self.steps}"
                + (f", {inner}" if inner else "")
                + f", restarts={self.restarts}, keep={self.keep!r}, loss={self.loss!r}, "
                  f"amp={self.amp!r}, early_stop={self.early_stop}, mode={self._target_mode}"
                + (f", model_mode={self.model_mode!r}" if self.model_mode != "eval" else "") + ")")

    def _repr_fields(self) -> Dict[str, object]:
        return {}

    # ------------------------------------------------------------ hooks
    def _init_state(self, rows: Rows, samples: int) -> None:
        """Add the attack's per-row state tensors to ``rows``."""

    def _direction(self, rows: Rows, k: int, first: Optional[Pass]) -> Tuple[Tensor, Optional[Tensor]]:
        """The step direction for the rows (its sign is taken), updating the state in
        ``rows``; and the logits at ``rows['x']`` when a pass was made there, else None.
        ``first``: (loss, logits, gradient) of the plain pass at x, at step 0, when ``run``
        made it."""
        raise NotImplementedError

    # ------------------------------------------------------------ passes
    copies = 1  # rows per point in a step's pass (SI's scale copies, VMI's neighbours, ...)

    def _copies_rows(self, x: Tensor, y: Tensor, t: Optional[Tensor], n: int) -> int:
        """Rows per model pass for the ``copies·n`` rows of a step: what the engine's budget
        allows (CPU: the last-level cache; GPU: half the free memory); for a model with a
        module in training mode, ``n`` (one copy per pass: batch statistics over the
        copies together would differ from torchattacks' passes one copy at a time)."""
        module = module_of(self.model)
        self._coupled = module is not None and any(m.training for m in module.modules())
        if self._coupled or self.copies == 1 or n == 0:
            return n
        if self.max_batch:
            return max(n, self.max_batch)
        return max(n, _engine.auto_max_rows(self, x, y, t, self.copies * n))

    def _pass(self, x: Tensor, y: Tensor, aux: Optional[Tensor] = None,
              loss_fn: Optional[Callable] = None) -> Pass:
        """``loss_and_grad`` on the rows ``x`` in pieces of ``_pass_rows``. ``aux`` travels
        in the target slot: the targets, or any per-row tensor ``loss_fn(z, y, aux)`` reads."""
        return chunked_loss_and_grad(self, x, y, aux, loss_fn, self._pass_rows)

    def _copies_pass(self, u: Tensor, copies: int, y: Tensor, aux: Optional[Tensor] = None,
                     loss_fn: Optional[Callable] = None) -> Pass:
        """One pass over ``copies`` copy-major blocks of rows (``u`` is ``[copies·n, ...]``)."""
        return self._pass(u, _engine.tile(y, copies), None if aux is None else _engine.tile(aux, copies),
                          loss_fn)

    # ------------------------------------------------------------ plumbing
    def _attack(self, x: Tensor, y: Tensor, target: Optional[Tensor], gen: torch.Generator):
        self._gen = gen
        self._cpu_gen = None
        try:
            return super()._attack(x, y, target, gen)
        finally:
            self._gen = None
            self._pass_rows = None

    def _clean_logits(self, xf: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        if self.plain_first_pass:
            return super()._clean_logits(xf, y, target)
        self.__dict__.pop("_first_pass", None)
        return Attack._clean_logits(self, xf, y, target)

    def _loop(self, loop: _engine.StepLoop, x_nat: Tensor, y: Tensor, t: Optional[Tensor],
              x0: Tensor, samples: int, first=None) -> _engine.LoopOutput:
        state_loop = StateLoop(self, self._step, loop.steps, keep=loop.keep,
                               early_stop=loop.early_stop, pass_rows=loop.pass_rows)
        return state_loop.run(x_nat, y, t, x0, samples, first=first)

    # ------------------------------------------------------------ starts
    def _into_ball(self, x0: Tensor, x_nat: Tensor) -> Tensor:
        """A start brought into the eps-ball and the box (where the recipe's own start can
        lie outside the ball, e.g. TPGD's normal noise for a tiny eps): every candidate the
        attack may return is inside."""
        from .. import ops
        return ops.linf_project_(x0, x_nat, self.eps, self.lower, self.upper, backend=self.backend,
                                 _check_values=False)

    def _uniform_start(self, x_nat: Tensor, gen: torch.Generator) -> Tensor:
        """torchattacks' uniform start: ``x + U(-eps, eps)``, clamped to the box."""
        u = torch.empty(x_nat.shape, dtype=torch.float32, device=x_nat.device)
        u.uniform_(-self.eps, self.eps, generator=gen)
        return (x_nat + u).clamp_(self.lower, self.upper).contiguous(
            memory_format=_engine.memory_format(x_nat))

    def _draw_cpu_generator(self) -> torch.Generator:
        """A CPU generator for the scalar draws a step makes (input-diversity sizes): the
        attack's own on a CPU; on a GPU one seeded from it (scalars read on the host)."""
        gen = self._gen
        if gen.device.type == "cpu":
            return gen
        if self._cpu_gen is None:  # once per run
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=gen.device).item())
            self._cpu_gen = torch.Generator().manual_seed(seed)
        return self._cpu_gen


def decay_arg(decay) -> float:
    """A momentum factor: a finite number >= 0."""
    return Attack._nonneg("decay", decay)
