"""The iterative-attack engine: best-iterate tracking, an active set for early stop, restart
chunking, and CUDA-graph replay of the whole step loop.

PGD uses all of it through ``StepLoop``; an APGD-style attack can reuse the pieces:
``ActiveSet`` (which rows are still attacked, gathering per-row state when rows leave),
``BestIterate`` (first success, else highest loss, per row, without host syncs),
``restart_blocks`` / ``auto_max_rows`` (restarts as one batch, chunked to a budget) and
``pick_restart`` / ``merge_best`` (the worst case kept per sample).
"""
from __future__ import annotations

import functools
import glob
import os
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _loss_scale
from ._groups import chunked_loss_and_grad, finite_rows, memory_format, warn_nonfinite
from .base import module_of

__all__ = ["BestIterate", "ActiveSet", "LoopOutput", "StepLoop", "GraphedLoop", "restart_blocks",
           "auto_max_rows", "pick_restart", "merge_best", "tile", "per_sample", "memory_format",
           "warn_nonfinite"]

# A step: update x (the active rows) in place from the gradient.
StepFn = Callable[[Tensor, Tensor, Tensor], None]


def per_sample(t: Tensor, ndim: int) -> Tensor:
    """View a ``[B]`` tensor so that it broadcasts against a ``[B, ...]`` tensor of ``ndim`` dims."""
    return t.view((-1,) + (1,) * (ndim - 1))


def _or_rows(dst: Tensor, flag: Tensor, rows: Optional[Tensor]) -> None:
    """``dst[rows] |= flag`` in place (every row when ``rows`` is None)."""
    if rows is None:
        dst.logical_or_(flag)
    else:
        dst.index_copy_(0, rows, dst[rows].logical_or_(flag))


def tile(t: Tensor, n: int) -> Tensor:
    """``n`` copies of the batch ``t`` stacked along dim 0 (restart-major), layout kept."""
    if n == 1:
        return t
    return torch.cat([t] * n)


# ------------------------------------------------------------ best iterate
class BestIterate:
    """Per row, the best iterate seen: the first one that succeeds, else the one of highest loss.

    ``update`` is a few elementwise ops and no host sync. A row's success freezes its
    iterate; a NaN loss (the loss of logits that are not finite) is never better than
    anything. ``last=True``: the last iterate whose loss is not NaN instead (keep="last"
    that never returns a point the model gave non-finite logits for)."""

    def __init__(self, x: Tensor, last: bool = False):
        n = x.shape[0]
        self.last = last
        self.x = x.detach().clone()
        self.loss = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
        self.success = torch.zeros(n, dtype=torch.bool, device=x.device)

    def _take(self, loss: Tensor, success: Tensor, b_loss: Tensor, b_succ: Tensor) -> Tensor:
        if self.last:
            return ~torch.isnan(loss)
        return success.logical_or(loss > b_loss).logical_and_(~b_succ)

    def update(self, x: Tensor, loss: Tensor, success: Tensor, rows: Optional[Tensor] = None) -> None:
        """Offer iterate ``x`` (its per-row ``loss`` and ``success``) for ``rows`` (all when None)."""
        if rows is None:
            take = self._take(loss, success, self.loss, self.success)
            torch.where(per_sample(take, x.dim()), x, self.x, out=self.x)
            torch.where(take, loss, self.loss, out=self.loss)
            if self.last:
                torch.where(take, success, self.success, out=self.success)
            else:
                self.success.logical_or_(success)
            return
        b_succ, b_loss = self.success[rows], self.loss[rows]
        take = self._take(loss, success, b_loss, b_succ)
        self.x.index_copy_(0, rows, torch.where(per_sample(take, x.dim()), x, self.x[rows]))
        self.loss.index_copy_(0, rows, torch.where(take, loss, b_loss))
        self.success.index_copy_(0, rows, torch.where(take, success, b_succ) if self.last
                                 else b_succ.logical_or(success))


# --------------------------------------------------------------- active set
class ActiveSet:
    """The rows of a batch still being attacked.

    Starts with every row active (``idx`` None: state tensors are used as they are, no
    copy). ``shrink(keep)`` drops the rows whose ``keep`` is False and returns the positions
    kept, with which the caller gathers its per-row state (``gather``). Finding the kept rows
    is a host sync, so on a GPU callers shrink only at steps where ``due(step)`` says so:
    every step at first, then every ~step/4 steps (1..8, 10, 12, 15, 18, 22, 27, 33, 41,
    ...). On a CPU a sync costs nothing and every step is due."""

    def __init__(self, rows: int, device: torch.device, min_drop: float = 0.05,
                 every_step: Optional[bool] = None):
        self.rows = rows
        self.device = device
        self.every_step = device.type == "cpu" if every_step is None else bool(every_step)
        self.idx: Optional[Tensor] = None   # row ids (into the full batch) of the active rows
        self.min_drop = min_drop
        self._next = 1

    def __len__(self) -> int:
        return self.rows if self.idx is None else int(self.idx.numel())

    def due(self, step: int) -> bool:
        """Whether to look for finished rows after ``step`` steps."""
        if self.every_step:
            return True
        if step < self._next:
            return False
        self._next = step + max(1, step // 4)
        return True

    def full_index(self) -> Tensor:
        return self.idx if self.idx is not None else torch.arange(self.rows, device=self.device)

    def shrink(self, keep: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Drop the active rows where ``keep`` (bool, one per active row) is False.

        Returns ``(kept positions within the active rows, row ids dropped)``, or
        ``(None, None)`` when too few rows would leave to be worth the copies."""
        n = len(self)
        pos = keep.nonzero().squeeze(1)     # the host sync
        k = int(pos.numel())
        if k == n or (k > 0 and n - k < self.min_drop * n):
            return None, None
        full = self.full_index()
        gone = full[~keep]
        self.idx = full[pos]
        return pos, gone

    @staticmethod
    def gather(pos: Tensor, *tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
        """Each per-row tensor restricted to the kept positions (None stays None)."""
        return [None if t is None else t[pos] for t in tensors]


# --------------------------------------------------------- restart chunking
def restart_blocks(n_samples: int, restarts_left: int, max_rows: int) -> Tuple[int, int]:
    """How to run the next restarts: ``(restarts in this block, samples per chunk)``.

    All samples' restarts go in one ``restarts·n`` batch when it fits in ``max_rows``;
    else as many whole restarts as fit; else one restart in equal chunks of at most
    ``max_rows`` samples."""
    max_rows = max(1, int(max_rows))
    if n_samples <= max_rows:
        return max(1, min(restarts_left, max_rows // max(n_samples, 1))), n_samples
    chunks = -(-n_samples // max_rows)
    return 1, -(-n_samples // chunks)


@functools.lru_cache(maxsize=1)
def cpu_cache_bytes() -> int:
    """The last-level CPU cache (``FASTADV_CPU_CACHE_BYTES`` overrides; 32 MiB if unknown)."""
    env = os.environ.get("FASTADV_CPU_CACHE_BYTES")
    if env:
        return int(env)
    best = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "size")) as fh:
                text = fh.read().strip().upper()
        except OSError:
            continue
        mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 * 2 ** 20


def saved_bytes_per_row(attack, x: Tensor, y: Tensor, target: Optional[Tensor]) -> float:
    """Bytes autograd keeps for the backward, per row of ``x``: the slope between probe
    forwards on 1 and 3 rows (so the weights a layer saves once are not counted per row).
    Cached on the attack per input shape, device and amp."""
    key = (tuple(x.shape[1:]), x.stride()[1:], str(x.device), attack.amp)
    cache = attack.__dict__.setdefault("_saved_bytes", {})
    if key in cache:
        return cache[key]
    sizes = []
    for n in (1, 3):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        xs = x[:1].expand((n,) + tuple(x.shape[1:])).contiguous(
            memory_format=memory_format(x)).requires_grad_(True)
        ys = y[:1].expand(n)
        ts = None if target is None else target[:1].expand(n)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attack.attack_loss(attack.logits(xs), ys, ts)
        sizes.append(total)
    per_row = max((sizes[1] - sizes[0]) / 2.0, float(x[0].numel() * 4))
    cache[key] = per_row
    return per_row


def auto_max_rows(attack, x: Tensor, y: Tensor, target: Optional[Tensor], wanted: int) -> int:
    """Rows per forward for a run of ``wanted`` rows (``restarts·B``).

    CPU: chunks whose saved activations fit the last-level cache (at least 32 rows): a
    forward+backward on a cache-sized chunk costs up to 2x less per sample than on a big
    batch on these CPUs; the math per sample is the same. A model with a module in
    training mode (batch statistics couple the rows) is never split below its batch.
    CUDA: the user's batch as given; with restarts, as many rows as fit in half the free
    memory."""
    b = x.shape[0]
    if b == 0:
        return 1
    model = module_of(attack.model)
    coupled = model is not None and any(m.training for m in model.modules())
    try:
        if x.device.type == "cuda":
            if wanted <= b:
                return b
            per_row = 2.0 * saved_bytes_per_row(attack, x, y, target) + 3 * x[0].numel() * 4
            free, _ = torch.cuda.mem_get_info(x.device)
            rows = int(0.5 * free / per_row)
            return max(b, min(wanted, rows)) if coupled else max(1, min(wanted, rows))
        if coupled:
            return max(b, min(wanted, 8192))
        rows = int(cpu_cache_bytes() / saved_bytes_per_row(attack, x, y, target))
        return max(1, min(wanted, max(32, min(rows, 8192))))
    except Exception:  # a probe that fails must not fail the attack: run the batch as given
        return b


def pick_restart(x: Tensor, loss: Tensor, success: Tensor, restarts: int
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reduce ``restarts·n`` rows (restart-major) to ``n``: a successful row if any, the one of
    highest loss among those. Returns ``(x, loss, success, restart index)``."""
    if restarts == 1:
        return x, loss, success, torch.zeros_like(loss, dtype=torch.long)
    n = x.shape[0] // restarts
    succ = success.view(restarts, n)
    any_succ = succ.any(0)
    key = torch.where(succ == any_succ, loss.view(restarts, n), float("-inf"))
    key = torch.nan_to_num(key, nan=float("-inf"))
    r = key.argmax(0)
    rows = r * n + torch.arange(n, device=x.device)
    return x[rows], loss[rows], success[rows], r


def merge_best(dst_x: Tensor, dst_loss: Tensor, dst_succ: Tensor, idx: Optional[Tensor],
               x: Tensor, loss: Tensor, succ: Tensor) -> Tensor:
    """Fold candidates for samples ``idx`` (all when None) into the result in place: a success
    beats a failure, else the higher loss wins. Returns which samples took the candidate."""
    if idx is None:
        o_succ, o_loss = dst_succ, dst_loss
    else:
        o_succ, o_loss = dst_succ[idx], dst_loss[idx]
    take = (succ & ~o_succ) | ((succ == o_succ) & (loss > o_loss))
    new_x = torch.where(per_sample(take, x.dim()), x, dst_x if idx is None else dst_x[idx])
    new_loss = torch.where(take, loss, o_loss)
    new_succ = o_succ | succ
    if idx is None:
        dst_x.copy_(new_x)
        dst_loss.copy_(new_loss)
        dst_succ.copy_(new_succ)
    else:
        dst_x.index_copy_(0, idx, new_x)
        dst_loss.index_copy_(0, idx, new_loss)
        dst_succ.index_copy_(0, idx, new_succ)
    return take


# ---------------------------------------------------------------- the loop
@dataclass
class LoopOutput:
    """Per row of the batch the loop ran on."""
    x: Tensor          # best (or last) iterate
    loss: Tensor       # its loss (float32)
    success: Tensor    # bool
    steps: Tensor      # int64, gradient steps spent on the row
    nonfinite: Optional[Tensor] = None  # bool: the model gave the row non-finite logits


class StepLoop:
    """K gradient steps on a batch of rows, each ``step(x, x_nat, grad)`` in place.

    keep        "best": return each row's best iterate (first success, else highest loss,
                x_K included through one extra forward); "last": the last iterate.
    early_stop  rows whose sample has succeeded (any restart: rows ``i``, ``i+n``, ...
                of a chunk of ``n`` samples) leave the batch at the steps ``ActiveSet.due``
                picks; under amp, a success is first confirmed in float32.
    The loop makes no host sync except at those steps and once at the end (the check
    that the model's output depends on the input)."""

    def __init__(self, attack, step: StepFn, steps: int, *, keep: str = "best",
                 early_stop: bool = False, pass_rows: Optional[int] = None):
        self.attack = attack
        self.step = step
        self.steps = int(steps)
        self.keep = keep
        self.early_stop = early_stop
        # rows per forward+backward when the batch is larger (None: the whole batch)
        self.pass_rows = pass_rows
        self.fp16 = attack.amp in ("fp16", "float16")

    def _loss_and_grad(self, x: Tensor, y: Tensor, t: Optional[Tensor], gs: Optional[Tensor]):
        return chunked_loss_and_grad(self.attack, x, y, t, None, self.pass_rows, grad_scale=gs)

    # -------------------------------------------------------------- eager
    def run(self, x_nat: Tensor, y: Tensor, target: Optional[Tensor], x0: Tensor,
            samples: int, first: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> LoopOutput:
        """Attack ``x_nat`` (rows; ``samples`` distinct samples, restart-major) from ``x0``.
        ``first``: the (loss, logits, gradient) of the first step's pass at ``x0``, already
        computed by the caller (float32, no loss scaling)."""
        atk = self.attack
        n, dev = x_nat.shape[0], x_nat.device
        x = x0.clone()
        best = BestIterate(x, last=self.keep == "last")
        active = ActiveSet(n, dev)
        row_steps = torch.zeros(n, dtype=torch.long, device=dev)
        bad = torch.zeros(n, dtype=torch.bool, device=dev)
        gs = _loss_scale.new_state(n, dev) if self.fp16 else None
        xa, xn, ya, ta = x, x_nat, y, target
        grad_seen: Optional[Tensor] = None
        done = 0
        for k in range(self.steps):
            if k == 0 and first is not None and gs is None:
                loss, z, g = first
            else:
                loss, z, g = self._loss_and_grad(xa, ya, ta, gs)
            fin = finite_rows(z)
            _or_rows(bad, ~fin, active.idx)
            if k == 0 or self.fp16:
                # fp16: an all-zero first step may be an underflow the scale has not grown out
                # of yet (CUDA makes no retry), so the evidence is every step's, checked at the end
                seen = self._grad_seen(g, gs, fin)
                grad_seen = seen if grad_seen is None else grad_seen | seen
            best.update(xa, loss, atk.is_success(z, ya, ta), active.idx)
            self.step(xa, xn, g)
            done = k + 1
            if self.early_stop and self.keep == "best" and done < self.steps and active.due(done):
                if not self.fp16:
                    self._check_grad(grad_seen)
                    grad_seen = None
                keep = self._still_attacked(best, active, samples, y, target)
                pos, gone = active.shrink(keep)
                if pos is not None:
                    row_steps.index_fill_(0, gone, done)
                    xa, xn, ya, ta, gs = active.gather(pos, xa, xn, ya, ta, gs)
                    if len(active) == 0:
                        break
        if len(active):
            with torch.no_grad():
                z = atk.logits(xa).float()
                fin = finite_rows(z)
                loss = torch.where(fin, atk.attack_loss(z, ya, ta).float(), float("nan"))
            _or_rows(bad, ~fin, active.idx)
            best.update(xa, loss, atk.is_success(z, ya, ta), active.idx)
            if active.idx is None:
                row_steps.fill_(done)
            else:
                row_steps.index_fill_(0, active.idx, done)
        self._check_grad(grad_seen)
        return LoopOutput(best.x, best.loss, best.success, row_steps, bad)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _grad_seen(g: Tensor, gs: Optional[Tensor], finite: Tensor) -> Tensor:
        """Evidence that the input gradient is not masked: a non-zero entry somewhere. A row
        whose logits are not finite, or whose fp16 pass overflowed (its scale backed off:
        negative), moves nothing for another reason and does not count against the model."""
        seen = g.ne(0).any() | (~finite).any()
        if gs is not None:
            seen = seen | gs.lt(0).any()
        return seen

    def _check_grad(self, seen: Optional[Tensor]) -> None:
        if seen is not None and not bool(seen):
            when = "at every step (fp16, at every loss scale tried)" if self.fp16 else "at the first step"
            raise ValueError(f"model: the input gradient is zero for every sample {when}: the "
                             f"model's output does not depend on x (or its gradient is masked)")

    def _still_attacked(self, best: BestIterate, active: ActiveSet, samples: int,
                        y: Tensor, target: Optional[Tensor]) -> Tensor:
        """Per active row: False where its sample already succeeded (in any restart).
        ``y``/``target``: the labels of every row of the batch."""
        if self.attack.amp is not None:
            self._confirm_fp32(best, active, y, target)
        done = best.success.view(-1, samples).any(0)
        return ~done[active.full_index() % samples]

    def _confirm_fp32(self, best: BestIterate, active: ActiveSet, y: Tensor,
                      target: Optional[Tensor]) -> None:
        """Under amp a success was judged on low-precision logits: confirm it in float32
        before the row leaves, and let a row that fails the check go on."""
        rows = active.full_index()
        claimed = rows[best.success[rows]]
        if claimed.numel() == 0:
            return
        with torch.no_grad():
            z = self.attack.logits(best.x[claimed], fp32=True).float()
        ok = self.attack.is_success(z, y[claimed], None if target is None else target[claimed])
        best.success.index_copy_(0, claimed, ok)


# ------------------------------------------------------------- CUDA graphs
class GraphedLoop:
    """The whole K-step loop of a ``StepLoop`` (no early stop) captured once as a CUDA graph
    for one static shape and replayed: inputs are copied into static buffers, outputs
    cloned out. Warm-up runs on a side stream before capture, as CUDA graphs require."""

    def __init__(self, loop: StepLoop, x_nat: Tensor, y: Tensor, target: Optional[Tensor],
                 x0: Tensor, samples: int, warmup_steps: int = 3):
        if x_nat.device.type != "cuda":
            raise RuntimeError("cuda_graph: needs a CUDA tensor")
        self.loop = loop
        self.samples = samples
        self.x_nat = x_nat.clone()
        self.y = y.clone()
        self.target = None if target is None else target.clone()
        self.x0 = x0.clone()
        dev = x_nat.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._body(min(warmup_steps, max(loop.steps, 1)))
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._body(loop.steps)

    def _body(self, steps: int) -> Tuple[LoopOutput, Tensor]:
        loop, atk = self.loop, self.loop.attack
        n, dev = self.x_nat.shape[0], self.x_nat.device
        x = self.x0.clone()
        best = BestIterate(x, last=loop.keep == "last")
        bad = torch.zeros(n, dtype=torch.bool, device=dev)
        gs = _loss_scale.new_state(n, dev) if loop.fp16 else None
        seen = torch.ones((), dtype=torch.bool, device=dev)
        for k in range(steps):
            loss, z, g = atk.loss_and_grad(x, self.y, self.target, grad_scale=gs)
            fin = finite_rows(z)
            bad.logical_or_(~fin)
            if k == 0:
                seen = loop._grad_seen(g, gs, fin)
            elif loop.fp16:
                seen = seen | loop._grad_seen(g, gs, fin)
            best.update(x, loss, atk.is_success(z, self.y, self.target))
            loop.step(x, self.x_nat, g)
        with torch.no_grad():
            z = atk.logits(x).float()
            fin = finite_rows(z)
            loss = torch.where(fin, atk.attack_loss(z, self.y, self.target).float(), float("nan"))
        bad.logical_or_(~fin)
        best.update(x, loss, atk.is_success(z, self.y, self.target))
        row_steps = torch.full((n,), steps, dtype=torch.long, device=dev)
        return LoopOutput(best.x, best.loss, best.success, row_steps, bad), seen

    def run(self, x_nat: Tensor, y: Tensor, target: Optional[Tensor], x0: Tensor) -> LoopOutput:
        self.x_nat.copy_(x_nat)
        self.y.copy_(y)
        if target is not None:
            self.target.copy_(target)
        self.x0.copy_(x0)
        self.graph.replay()
        out, seen = self.out
        self.loop._check_grad(seen)
        return LoopOutput(out.x.clone(), out.loss.clone(), out.success.clone(), out.steps.clone(),
                          out.nonfinite.clone())


def graph_key(attack, x_nat: Tensor, target: Optional[Tensor], extra: Sequence) -> tuple:
    """What a captured graph depends on: shapes, layout, dtype, device, the attack's
    numbers, where the model's parameters and buffers live, and each module's
    train/eval flag (with ``model_mode="keep"`` a dropout or BatchNorm switched
    between calls must not replay the other mode's kernels)."""
    model = module_of(attack.model)
    ptrs, modes = (), ()
    if model is not None:
        ptrs = tuple(t.data_ptr() for t in model.parameters()) + tuple(
            t.data_ptr() for t in model.buffers())
        modes = tuple(m.training for m in model.modules())
    return (tuple(x_nat.shape), x_nat.stride(), x_nat.dtype, str(x_nat.device),
            target is None, attack.amp, attack.loss, attack.model_mode,
            tuple(extra), ptrs, modes)


def warn_once(obj, key: str, msg: str) -> None:
    """A RuntimeWarning once per attack object and key."""
    seen = obj.__dict__.setdefault("_warned", set())
    if key not in seen:
        seen.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

