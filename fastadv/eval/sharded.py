"""Sharded evaluation: AutoAttack over the ranks of a process group (``torchrun``).

Each rank attacks a contiguous shard of the points; the per-point results are then
gathered so that every rank holds the whole answer — the adversarial batch, the
clean/robust flags, which attack fooled each point, which points met non-finite logits —
exactly as one process would report it. Under NCCL each rank works on its own GPU; under gloo on CPU processes.
Without an initialized process group (or with one rank) it is the plain call.

    from fastadv.train.distributed import init_from_env
    dev = init_from_env()                       # torchrun sets RANK / WORLD_SIZE
    aa = fastadv.AutoAttack(model.to(dev), eps=8/255)
    x_adv = run_standard_evaluation_sharded(aa, x.to(dev), y.to(dev), bs=250)
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..attacks.base import AttackResult
from ..train import distributed as _dist
from .metrics import autoattack_summary

__all__ = ["shard_range", "all_gather_rows", "run_standard_evaluation_sharded"]


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous shard of ``n`` points: sizes differ by at most one,
    the larger shards first."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank}")
    base, extra = divmod(int(n), world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_rows(t: Tensor, counts: List[int]) -> Tensor:
    """Concatenate every rank's ``t`` (its rows: ``counts[rank]`` of them) in rank order;
    every rank gets the whole. Shards of unequal length are padded for the collective."""
    world = len(counts)
    width = max(counts) if counts else 0
    dev = _dist.comm_device()
    is_bool = t.dtype == torch.bool
    src = t.to(torch.uint8) if is_bool else t  # gloo has no bool collectives
    buf = src.new_zeros((width,) + tuple(src.shape[1:]), device=dev)
    buf[: src.shape[0]] = src.to(dev)
    parts = [torch.empty_like(buf) for _ in range(world)]
    buf = buf.contiguous()
    _dist.collective(lambda: dist.all_gather(parts, buf), parts + [buf])
    out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)
    return out.bool() if is_bool else out.to(t.dtype)


def _gather_floats(values: List[float]) -> Tensor:
    """[world, len(values)] float64: every rank's ``values``."""
    v = torch.tensor(values, dtype=torch.float64)
    return all_gather_rows(v[None], [1] * _dist.world_size())


def run_standard_evaluation_sharded(aa, x: Tensor, y: Tensor, bs: int = 250,
                                    state_path: Optional[str] = None,
                                    progress: Optional[Callable[..., None]] = None) -> Tensor:
    """``aa.run_standard_evaluation(x, y)`` with the points split over the process group.

    Every rank must call it with the same ``x`` and ``y``. Returns the whole adversarial
    batch on every rank and leaves ``aa.last_result``, ``aa.clean_accuracy`` and
    ``aa.robust_accuracy`` describing all the points (per-attack times: the slowest
    rank's; work: summed). ``state_path`` gets a ``.rank<r>`` suffix per rank, so an
    interrupted sharded run resumes with the same world size."""
    world = _dist.world_size()
    if world == 1:
        return aa.run_standard_evaluation(x, y, bs=bs, state_path=state_path, progress=progress)
    if x.shape[:1] != y.shape:
        raise ValueError(f"y: expected shape [{x.shape[0]}] (one label per sample of x), got {tuple(y.shape)}")
    rank = _dist.rank()
    counts = [b - a for a, b in (shard_range(len(x), r, world) for r in range(world))]
    start, stop = shard_range(len(x), rank, world)
    path = f"{state_path}.rank{rank}" if state_path else None
    local_adv = aa.run_standard_evaluation(x[start:stop], y[start:stop], bs=bs, state_path=path,
                                           progress=progress)
    r = aa.last_result
    ex = r.extra
    names = list(ex["attacks"])
    x_adv = all_gather_rows(local_adv, counts)
    clean = all_gather_rows(ex["clean"], counts)
    robust = all_gather_rows(ex["robust"], counts)
    attack_of = all_gather_rows(ex["attack_of"], counts)
    steps = all_gather_rows(r.steps, counts)
    gathered = {}
    nf = ex.get("nonfinite")
    if isinstance(nf, Tensor):   # points that met non-finite logits: all of them, not this shard's
        gathered["nonfinite"] = all_gather_rows(nf, counts)
    times = _gather_floats([float(ex["time"][n]) for n in names]).amax(0)
    work_keys = sorted(ex["work"])
    work = _gather_floats([float(ex["work"][k]) for k in work_keys]).sum(0)
    res = AttackResult(x_adv, ~robust, torch.zeros(len(x), device=x_adv.device), steps, extra={
        **ex, "clean": clean, "robust": robust, "attack_of": attack_of,
        "per_attack": {n: attack_of == k for k, n in enumerate(names)},
        "time": dict(zip(names, times.tolist())),
        "work": {k: int(v) for k, v in zip(work_keys, work.tolist())},
        "shards": counts, **gathered})
    res.extra["summary"] = autoattack_summary(res.extra)   # of all the points, not of this shard
    aa.last_result = res
    n = len(x)
    aa.clean_accuracy = clean.float().mean().item() if n else float("nan")
    aa.robust_accuracy = robust.float().mean().item() if n else float("nan")
    return x_adv
