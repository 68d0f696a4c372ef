"""Entries grouped by point: many runs of one attack (restarts × targets × eps) as one batch.

An attack that tries several things per point (restarts, target classes, eps
values) lays them out as *entries*, rows of one big batch, each tagged with the
*group* (usually the point) it works for. As soon as one entry of a group
succeeds, the whole group leaves the batch (``Working.compact``); at the end one
entry per group is picked (``pick_per_group``). Nothing here syncs with the host
except ``Working.compact``, which an attack calls every few iterations.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lp_norm", "view_rows", "pick_per_group", "group_any", "Working", "chunks", "Entries",
           "entry_chunks", "NORMS", "norm_name", "forward_rows", "chunked_loss_and_grad",
           "channels_last", "layout_like", "finite_rows", "warn_nonfinite", "success_margin",
           "returned_nonfinite"]

NORMS = ("Linf", "L2", "L1")
_ALIASES = {"linf": "Linf", "inf": "Linf", "l2": "L2", "2": "L2", "l1": "L1", "1": "L1"}


def norm_name(norm) -> str:
    """'Linf' | 'L2' | 'L1' from the spellings users write (``"Linf"``, ``"l2"``, ``2``,
    ``float('inf')``). A number that is not 1, 2 or +inf (``2.5``) is refused, not rounded."""
    key = None
    if isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        v = float(norm)
        if v == math.inf:
            key = "inf"
        elif v in (1.0, 2.0):
            key = str(int(v))
    elif isinstance(norm, str):
        key = norm.lower()
    if key not in _ALIASES:
        raise ValueError(f"norm: expected 'Linf', 'L2' or 'L1', got {norm!r}")
    return _ALIASES[key]


def view_rows(v: Tensor, like: Tensor) -> Tensor:
    """A per-row ``[N]`` tensor shaped to broadcast against ``[N, ...]``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def lp_norm(d: Tensor, norm: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-row Lp norm of ``d`` ([N, ...] -> [N]) in ``dtype`` (float32 by default)."""
    f = (d.flatten(1) if d.dim() > 1 else d[:, None]).to(dtype)
    if norm == "Linf":
        return f.abs().amax(1) if f.shape[1] else f.new_zeros(f.shape[0])
    if norm == "L2":
        return torch.linalg.vector_norm(f, 2, dim=1)
    return f.abs().sum(1)


def finite_rows(z: Tensor) -> Tensor:
    """[N] bool: every entry of the row is finite (no NaN, no inf). An attack never counts a
    point as fooled on logits that are not, nor takes such a point as its best."""
    return torch.isfinite(z).flatten(1).all(1) if z.dim() > 1 else torch.isfinite(z)


def group_any(flag: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """[G] bool: does any entry of the group have ``flag`` set."""
    acc = torch.zeros(n_groups, dtype=torch.int32, device=flag.device)
    acc.index_add_(0, group, flag.to(torch.int32))
    return acc > 0


def pick_per_group(group: Tensor, n_groups: int, success: Tensor, score: Tensor) -> Tuple[Tensor, Tensor]:
    """One entry per group: a successful one if there is one, else the one with the highest score.

    Returns (index [G] into the entries, success [G]). Every group must have an entry."""
    n = group.shape[0]
    key = torch.nan_to_num(score.float(), nan=-math.inf)
    key = torch.where(success, torch.full_like(key, math.inf), key)
    best = torch.full((n_groups,), -math.inf, device=key.device).scatter_reduce(
        0, group, key, reduce="amax", include_self=True)
    pos = torch.arange(n, device=key.device)
    cand = torch.where(key == best[group], pos, torch.full_like(pos, n))
    idx = torch.full((n_groups,), n, dtype=torch.long, device=key.device).scatter_reduce(
        0, group, cand, reduce="amin", include_self=True)
    idx = idx.clamp(max=max(n - 1, 0))
    return idx, success[idx]


class Working:
    """The rows still being worked on: named tensors sharing the first dimension.

    ``idx`` maps each working row back to its entry; ``compact(keep)`` drops rows."""

    def __init__(self, idx: Tensor, **tensors: Optional[Tensor]):
        self.idx = idx
        self.t: Dict[str, Optional[Tensor]] = dict(tensors)

    def __getattr__(self, name: str):
        t = self.__dict__.get("t")
        if t is not None and name in t:
            return t[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value):
        if name in ("idx", "t"):
            object.__setattr__(self, name, value)
        else:
            self.t[name] = value

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def compact(self, keep: Tensor) -> bool:
        """Keep only rows where ``keep``; returns False (and changes nothing) if all are kept."""
        if bool(keep.all()):
            return False
        rows = keep.nonzero().squeeze(1)
        self.idx = self.idx.index_select(0, rows)
        for k, v in self.t.items():
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == keep.shape[0]:
                self.t[k] = v.index_select(0, rows)
        return True


def channels_last(x: Tensor) -> Tensor:
    """``x`` with NHWC strides that say so. ``x.contiguous(memory_format=channels_last)``
    leaves a one-channel batch with NCHW strides (both layouts are "contiguous" then), and
    oneDNN keeps NCHW activations for it: 2x slower convolutions and pools on MNIST-shaped
    input. For one channel the memory order is the same, so this is a free view."""
    if x.dim() != 4:
        return x
    n, c, h, w = x.shape
    want = (h * w * c, 1, w * c, c)
    if x.stride() == want or x.numel() == 0:
        return x
    if c == 1 and x.is_contiguous():
        return x.as_strided(x.shape, want)
    out = torch.empty_strided(x.shape, want, dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def layout_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (shaped like ``like``) in ``like``'s memory layout (``memory_format``), with
    ``like``'s very strides where both are dense in that layout; for one channel that undoes
    ``channels_last`` (a free view)."""
    fmt = memory_format(like)
    out = t.contiguous(memory_format=fmt)
    if out.stride() != like.stride() and like.is_contiguous(memory_format=fmt):
        # both dense in one layout: only the strides of size-1 dims differ, same addresses
        out = out.as_strided(out.shape, like.stride(), out.storage_offset())
    return out


def forward_rows(attack, x: Tensor, y: Tensor, tgt: Optional[Tensor]) -> Optional[int]:
    """Rows per forward/backward for a batch like ``x``: on CPU, chunks whose saved
    activations fit the last-level cache (same math per row, less time); elsewhere None
    (the whole batch). Uses the engine's probe when it is there."""
    if x.device.type != "cpu" or x.shape[0] == 0:
        return None
    try:
        from ._engine import auto_max_rows
    except ImportError:  # pragma: no cover - the engine ships with the package
        return None
    k = min(int(x.shape[0]), 4)
    rows = auto_max_rows(attack, x[:k], y[:k], None if tgt is None else tgt[:k], int(x.shape[0]))
    return rows if rows < x.shape[0] else None


def chunked_loss_and_grad(attack, x: Tensor, y: Tensor, tgt: Optional[Tensor], loss_fn,
                          rows: Optional[int], grad_scale: Optional[Tensor] = None):
    """``attack.loss_and_grad`` over row chunks of at most ``rows`` (all at once if None).
    ``grad_scale`` (fp16 loss scaling, updated in place) is sliced with the rows: its
    slices are views, so every chunk updates the caller's tensor."""
    n = x.shape[0]
    if not rows or n <= rows:
        return attack.loss_and_grad(x, y, tgt, loss_fn, grad_scale=grad_scale)
    parts = [attack.loss_and_grad(x[i:i + rows], y[i:i + rows],
                                  None if tgt is None else tgt[i:i + rows], loss_fn,
                                  grad_scale=None if grad_scale is None else grad_scale[i:i + rows])
             for i in range(0, n, rows)]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]))


def chunks(n_points: int, rows_per_point: int, max_rows: Optional[int]):
    """Slices of points such that each chunk has at most ``max_rows`` rows (at least one point)."""
    if not max_rows:
        yield slice(0, n_points)
        return
    per = max(1, int(max_rows) // max(1, rows_per_point))
    for s in range(0, n_points, per):
        yield slice(s, min(n_points, s + per))


class Entries:
    """One chunk of points laid out as entries: point-major, then target, then restart.

    pts     [m] the points (indices into the batch) in this chunk
    x, y, target, eps   per entry ([m·reps, ...]; target None if untargeted)
    group   [m·reps] the point of each entry, 0..m-1 within the chunk
    """

    def __init__(self, pts: Tensor, x: Tensor, y: Tensor, target: Optional[Tensor], eps: Tensor,
                 n_targets: int, n_restarts: int):
        self.pts, self.x, self.y, self.target, self.eps = pts, x, y, target, eps
        self.n_points = int(pts.numel())
        self.n_targets, self.n_restarts = n_targets, n_restarts
        self.group = torch.arange(self.n_points, device=x.device).repeat_interleave(
            n_targets * n_restarts, 0)

    @property
    def restart(self) -> Tensor:
        """[m·reps] the restart index of each entry."""
        return torch.arange(self.n_restarts, device=self.x.device).repeat(self.n_points * self.n_targets)

    def per_point_sum(self, v: Tensor) -> Tensor:
        """[m] the sum over each point's entries of a per-entry ``v``."""
        return torch.zeros(self.n_points, dtype=v.dtype, device=v.device).index_add_(0, self.group, v)


def entry_chunks(todo: Tensor, x: Tensor, y: Tensor, targets: Optional[Tensor], eps: Tensor,
                 n_restarts: int, max_rows: Optional[int]) -> Iterator[Entries]:
    """The points ``todo`` (indices into ``x``) expanded to points × targets × restarts entries,
    in chunks of at most ``max_rows`` entries (at least one point per chunk).

    ``targets``: a ``[B, T]`` table of target classes per point, or None (untargeted)."""
    n_t = 1 if targets is None else targets.shape[1]
    reps = n_t * n_restarts
    for sl in chunks(todo.numel(), reps, max_rows):
        pts = todo[sl]
        if pts.numel() == 0:
            continue
        te = None if targets is None else targets.index_select(0, pts).repeat_interleave(
            n_restarts, 1).reshape(-1)
        yield Entries(pts, x.index_select(0, pts).repeat_interleave(reps, 0),
                      y.index_select(0, pts).repeat_interleave(reps, 0), te,
                      eps.index_select(0, pts).repeat_interleave(reps, 0), n_t, n_restarts)


def warn_nonfinite(attack, res) -> None:
    """Once per run: say for how many points the model gave non-finite logits (NaN or inf)
    at a point the attack tried (``res.extra["nonfinite"]``, bool per point). Such logits
    never made a point count as fooled, nor made it the point returned; with
    ``res.extra["nonfinite_at"] == "returned"`` (attacks that do not track them: the base
    class checked the points returned) they are at the returned points, counted not fooled."""
    flags = res.extra.get("nonfinite") if isinstance(res.extra, dict) else None
    if not isinstance(flags, Tensor) or flags.numel() == 0:
        return
    k = int(flags.sum())  # one host sync per run
    if k == 0:
        return
    amp = getattr(attack, "amp", None)
    hint = ""
    if amp in ("fp16", "float16"):
        hint = (" Under amp='fp16' these may be overflows of the fp16 forward (float32 logits "
                "may be finite there): amp='bf16' or None attacks such points fully.")
    name = getattr(attack, 'attack', type(attack).__name__)
    if res.extra.get("nonfinite_at") == "returned":
        warnings.warn(f"fastadv: {name}: the model returned non-finite logits (NaN or inf) at the "
                      f"points returned for {k} of {flags.numel()} inputs. Those count as not "
                      f"fooled (the argmax of a non-finite row says nothing about the model), so "
                      f"their robustness may be overstated.{hint}", RuntimeWarning, stacklevel=3)
        return
    warnings.warn(f"fastadv: {name}: the model returned "
                  f"non-finite logits (NaN or inf) at points tried for {k} of {flags.numel()} "
                  f"inputs. No point counted as fooled on such logits, and none was returned: each "
                  f"of those inputs keeps its best point with finite logits (its clean point at "
                  f"worst), so its robustness may be overstated.{hint}",
                  RuntimeWarning, stacklevel=3)


def returned_nonfinite(z: Tensor) -> dict:
    """The ``extra`` entries of an attack that does not track non-finite logits along the way,
    from the logits ``z`` at the points it returns (``warn_nonfinite`` reads them; without
    them the base class makes that forward itself)."""
    return {"nonfinite": ~finite_rows(z), "nonfinite_at": "returned"}


def success_margin(z: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    """How far each row is from success (<= 0: fooled, or classified as the target):
    ``z_label − max_other`` untargeted, ``max_other − z_target`` targeted (float, per row)."""
    lab = y if target is None else target
    z_l = z.gather(1, lab[:, None]).squeeze(1)
    z_o = z.scatter(1, lab[:, None], -math.inf).amax(1)
    return z_l - z_o if target is None else z_o - z_l
