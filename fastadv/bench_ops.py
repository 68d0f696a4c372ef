"""The ops benchmark: each fused op on each backend against the eager sequence torchattacks runs.

``ops_table(...)`` returns one row per (size, op, backend) and ``format_table(rows)``
prints them; ``fastadv bench ops`` and benchmarks/bench_ops.py call these. The
baseline ``eager`` is what torchattacks' PGD / PGDL2 do per step, e.g. for L∞::

    adv = x_adv + alpha * grad.sign(); delta = torch.clamp(adv - x, -eps, eps)
    adv = torch.clamp(x + delta, 0, 1)

On a GPU each row also gives the achieved bandwidth as a fraction of a plain
``copy_`` moving the same bytes (the op reads x_adv, x_nat, grad and writes out).
Timings are medians over interleaved repeats (all candidates share the noise);
the minimum is reported beside them.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

OPS = ("linf_step", "l2_step", "linf_project", "l2_project")
CPU_SIZES = [(128, 3, 32, 32), (512, 3, 32, 32)]
GPU_SIZES = [(128, 3, 32, 32), (512, 3, 32, 32), (256, 3, 224, 224)]
BIG_SIZES = [(64, 3, 224, 224), (256, 3, 224, 224)]


def default_sizes(device: str) -> List[Tuple[int, ...]]:
    """Small sizes on CPU (FASTADV_BENCH_BIG=1 adds 224x224 batches); all of them on a GPU."""
    if device == "cuda":
        return list(GPU_SIZES)
    sizes = list(CPU_SIZES)
    if os.environ.get("FASTADV_BENCH_BIG") == "1":
        sizes += BIG_SIZES
    return sizes


# ----------------------------------------------------------- eager baselines
def eager_linf_step(x_adv, x, grad, alpha, eps):
    adv = x_adv + alpha * grad.sign()
    delta = torch.clamp(adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0, max=1)


def eager_l2_step(x_adv, x, grad, alpha, eps):
    b = x.shape[0]
    shape = (-1,) + (1,) * (x.dim() - 1)
    grad_norms = torch.norm(grad.reshape(b, -1), p=2, dim=1) + 1e-10
    grad = grad / grad_norms.view(shape)
    adv = x_adv + alpha * grad
    delta = adv - x
    delta_norms = torch.norm(delta.reshape(b, -1), p=2, dim=1)
    factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
    delta = delta * factor.view(shape)
    return torch.clamp(x + delta, min=0, max=1)


def eager_linf_project(x_adv, x, eps):
    return torch.clamp(x + torch.clamp(x_adv - x, min=-eps, max=eps), min=0, max=1)


def eager_l2_project(x_adv, x, eps):
    b = x.shape[0]
    delta = x_adv - x
    delta_norms = torch.norm(delta.reshape(b, -1), p=2, dim=1)
    factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
    return torch.clamp(x + delta * factor.view((-1,) + (1,) * (x.dim() - 1)), min=0, max=1)


EAGER = {"linf_step": eager_linf_step, "l2_step": eager_l2_step,
         "linf_project": eager_linf_project, "l2_project": eager_l2_project}


def _params(op: str) -> Tuple[float, float]:
    return (2 / 255, 8 / 255) if op.startswith("linf") else (0.1, 0.5)


# -------------------------------------------------------------------- timing
def _timer(device: str) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call of fn, over n calls."""
    if device == "cuda":
        def timed(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
    else:
        def timed(fn, n):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n
    return timed


def measure(fns: Dict[str, Callable[[], object]], device: str, repeats: int = 7,
            target_s: float = 0.05) -> Dict[str, Tuple[float, float]]:
    """{name: (median s, min s)} per call; candidates interleaved repeat by repeat."""
    timed = _timer(device)
    calls = {}
    for name, fn in fns.items():
        for _ in range(2):
            fn()  # warm up (allocator, caches, lazy init)
        once = max(timed(fn, 1), 1e-7)
        calls[name] = max(1, min(1000, int(target_s / once)))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, calls[name]))
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def ready_backends(device: str) -> List[str]:
    from fastadv import ops
    from fastadv.ops import _registry

    names = []
    for name, st in ops.backends().items():
        if st is not True:
            continue
        if name == "triton" and device == "cpu":
            continue  # the interpreter: correct, far too slow to time
        obj = _registry._backend_object(name)
        if obj is not None and obj.supports(torch.device(device)) is True:
            names.append(name)
    return names


def make_inputs(shape: Sequence[int], device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(x_adv, x_nat, grad) as an attack step sees them: x_adv near x_nat, a dense gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x_nat = torch.rand(tuple(shape), generator=gen, device=device)
    x_adv = (x_nat + 0.01 * torch.randn(tuple(shape), generator=gen, device=device)).clamp(0, 1)
    grad = torch.randn(tuple(shape), generator=gen, device=device)
    return x_adv.to(dtype), x_nat.to(dtype), grad.to(dtype)


def make_call(op: str, backend: str, inputs) -> Callable[[], object]:
    """A no-argument call of ``op`` on ``backend`` ("eager": the torchattacks sequence)."""
    from fastadv import ops as fops

    x_adv, x_nat, grad = inputs
    alpha, eps = _params(op)
    step = op.endswith("step")
    if backend == "eager":
        f = EAGER[op]
        return (lambda: f(x_adv, x_nat, grad, alpha, eps)) if step else (lambda: f(x_adv, x_nat, eps))
    f = getattr(fops, op)
    if step:
        return lambda: f(x_adv, x_nat, grad, alpha, eps, backend=backend, _check_values=False)
    return lambda: f(x_adv, x_nat, eps, backend=backend, _check_values=False)


def ops_table(sizes: Optional[Iterable[Sequence[int]]] = None, backends: Optional[Sequence[str]] = None,
              threads: Optional[int] = None, ops: Sequence[str] = OPS, device: Optional[str] = None,
              dtype: torch.dtype = torch.float32, repeats: int = 7, target_s: float = 0.05) -> List[dict]:
    """Time every op of ``ops`` on every backend and the eager baseline; one row each.

    Rows: size, op, backend ("eager" is the baseline), dtype, device, threads,
    ms (median), ms_min, speedup (eager median / this median), gb_s, and on a GPU
    copy_gb_s and frac_of_copy (achieved bandwidth over copy_'s).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [tuple(s) for s in (sizes or default_sizes(device))]
    backends = [b for b in (backends if backends is not None else ready_backends(device)) if b != "eager"]
    old_threads = torch.get_num_threads()
    if threads and device == "cpu":
        torch.set_num_threads(int(threads))
    rows: List[dict] = []
    try:
        for shape in sizes:
            inputs = make_inputs(shape, device, dtype)
            elem = inputs[0].element_size()
            numel = inputs[0].numel()
            copy_src = torch.empty(2 * numel, dtype=dtype, device=device)
            copy_dst = torch.empty_like(copy_src)
            for op in ops:
                step = op.endswith("step")
                cands: Dict[str, Callable[[], object]] = {"eager": make_call(op, "eager", inputs)}
                for be in backends:
                    cands[be] = make_call(op, be, inputs)
                if device == "cuda":
                    cands["copy_"] = lambda: copy_dst.copy_(copy_src)
                times = measure(cands, device, repeats=repeats, target_s=target_s)
                nbytes = (4 if step else 3) * numel * elem  # inputs read once, out written once
                base = times["eager"][0]
                copy_bw = (2 * copy_src.numel() * elem / times["copy_"][0] / 1e9) if "copy_" in times else None
                for name, (med, best) in times.items():
                    if name == "copy_":
                        continue
                    row = {"size": "x".join(map(str, shape)), "op": op, "backend": name,
                           "dtype": str(dtype).replace("torch.", ""), "device": device,
                           "threads": torch.get_num_threads() if device == "cpu" else None,
                           "ms": med * 1e3, "ms_min": best * 1e3, "speedup": base / med,
                           "gb_s": nbytes / med / 1e9}
                    if copy_bw:
                        row["copy_gb_s"] = copy_bw
                        row["frac_of_copy"] = row["gb_s"] / copy_bw
                    rows.append(row)
    finally:
        torch.set_num_threads(old_threads)
    return rows


def format_table(rows: List[dict]) -> str:
    """A plain-text table of ops_table rows."""
    if not rows:
        return "(no rows)"
    gpu = any("frac_of_copy" in r for r in rows)
    head = ["size", "op", "backend", "dtype", "ms", "ms min", "vs eager", "GB/s"]
    if gpu:
        head += ["% of copy_"]
    lines = [head]
    for r in rows:
        line = [r["size"], r["op"], r["backend"], r["dtype"], f"{r['ms']:.3f}", f"{r['ms_min']:.3f}",
                f"{r['speedup']:.2f}x", f"{r['gb_s']:.1f}"]
        if gpu:
            line.append(f"{100 * r['frac_of_copy']:.0f}%" if "frac_of_copy" in r else "")
        lines.append(line)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    dev = rows[0]["device"]
    thr = f", {rows[0]['threads']} threads" if rows[0].get("threads") else ""
    out.append(f"({dev}{thr}; median of interleaved repeats; 'vs eager' = eager median / median; "
               f"eager = the torchattacks per-step sequence)")
    return "\n".join(out)


if __name__ == "__main__":  # python -m fastadv.bench_ops
    print(format_table(ops_table(threads=2 if not torch.cuda.is_available() else None)))
