"""The ops benchmark: each fused op on each backend against the eager sequence torchattacks runs.

``ops_table(...)`` returns one row per (size, op, backend) and ``format_table(rows)``
prints them; ``fastadv bench ops`` and benchmarks/bench_ops.py call these. The
baseline ``eager`` is what torchattacks' PGD / PGDL2 do per step, e.g. for L∞::

    adv = x_adv + alpha * grad.sign(); delta = torch.clamp(adv - x, -eps, eps)
    adv = torch.clamp(x + delta, 0, 1)

On a GPU each row also gives the achieved bandwidth as a fraction of a plain
``copy_`` moving the same bytes (the op reads x_adv, x_nat, grad and writes out: the
minimum, ~4 tensor-sizes); the triton backend's L2 rows add the DRAM bytes its schedule
is estimated to move (``l2_traffic``: an estimate from the cache model, not a counter).
Timings are medians over interleaved repeats (all candidates share the noise);
the minimum is reported beside them.
"""
from __future__ import annotations

import contextlib
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


def l2_traffic(op: str, backend: str, inputs) -> dict:
    """For the triton backend's L2 ops on a GPU: the schedule ``l2_schedule`` picks for these
    inputs on this device and its DRAM estimate (est_dram_bytes, min_dram_bytes, min_over_est:
    1.0 when each input is read once, 0.5 for three sweeps from memory); {} for other rows."""
    if backend != "triton" or not op.startswith("l2") or inputs[0].device.type != "cuda":
        return {}
    from fastadv.ops import _triton_backend as tb

    x_adv, _, grad = inputs
    s = tb.schedule_for(x_adv, grad if op.endswith("step") else None)
    return {"l2_schedule": f"{s.kind} {s.tiles}/sample {s.waves} waves {s.launches} launches",
            "est_dram_bytes": s.est_dram_bytes, "min_dram_bytes": s.min_dram_bytes,
            "min_over_est": s.min_dram_bytes / s.est_dram_bytes}


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
              dtype: torch.dtype = torch.float32, repeats: int = 7, target_s: float = 0.05,
              host: bool = True) -> List[dict]:
    """Time every op of ``ops`` on every backend and the eager baseline; one row each;
    with ``host``, then the host-time rows of ``host_table`` (kind "host").

    Rows: size, op, backend ("eager" is the baseline), dtype, device, threads,
    ms (median), ms_min, speedup (eager median / this median), gb_s, and on a GPU
    copy_gb_s and frac_of_copy (achieved bandwidth over copy_'s).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [tuple(s) for s in (sizes or default_sizes(device))]
    backends_arg = backends
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
                    row.update(l2_traffic(op, name, inputs))
                    rows.append(row)
        if host:
            rows += host_table(backends=None if backends_arg is None else backends, device=device)
    finally:
        torch.set_num_threads(old_threads)
    return rows


# ------------------------------------------------------------- host time
HOST_SHAPE = (4, 3, 8, 8)
HOST_OPS = ("linf_step_", "l2_step_", "linf_project_", "l2_project_",
            "linf_step", "l2_step", "linf_project", "l2_project")
NOOP = "torch (no-op kernels)"


class _NoopBackend:
    """The torch backend's interface with kernels that do nothing: what is left of a call
    is the Python and dispatch cost of the path to a backend."""

    name = "torch"

    def status(self):
        return True

    def supports(self, device):
        return True

    def linf_step(self, *args):
        pass

    l2_step = linf_project = l2_project = linf_step


def host_call(op: str, backend: str, inputs) -> Callable[[], object]:
    """A no-argument public call of ``op`` (``linf_step_`` in place, ``linf_step`` out of
    place, ...) with float alpha/eps, as an attack step makes it."""
    from fastadv import ops as fops

    x_adv, x_nat, grad = inputs
    alpha, eps = _params(op)
    f = getattr(fops, op)
    be = "torch" if backend == NOOP else backend
    if op.rstrip("_").endswith("step"):
        return lambda: f(x_adv, x_nat, grad, alpha, eps, backend=be, _check_values=False)
    return lambda: f(x_adv, x_nat, eps, backend=be, _check_values=False)


def _host_times(fn, calls: int) -> Tuple[float, float]:
    """(thread CPU µs, wall µs) per call over ``calls`` calls. CPU time is what a busy
    machine's preemption does not inflate; the kernels' own time is included."""
    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
    for _ in range(calls):
        fn()
    t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
    return (c1 - c0) / calls / 1e3, (t1 - t0) / calls / 1e3


def host_table(backends: Optional[Sequence[str]] = None, ops: Sequence[str] = HOST_OPS,
               device: Optional[str] = None, shape: Sequence[int] = HOST_SHAPE, calls: int = 200,
               repeats: int = 25) -> List[dict]:
    """Host time per call of each op on each backend, on a tiny batch: the direct eager
    path against the same call forced through the registered custom op (what every call
    took before the direct path; tracing, compiling and capture still take it).

    Rows: kind "host", op, backend (also "torch (no-op kernels)" on CPU: the torch path's
    Python/dispatch cost alone), size, device, direct_us / custom_us (median thread CPU µs
    per call over ``repeats`` windows of ``calls`` calls, the two interleaved), their
    *_wall_min (the fastest window's wall µs), and saving (custom_us / direct_us).
    """
    from fastadv import ops as fops
    from fastadv.ops import _registry

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = list(backends if backends is not None else ready_backends(device))
    if device == "cpu" and backends is None:
        names.append(NOOP)
    inputs = make_inputs(shape, device)
    rows: List[dict] = []
    for backend in names:
        ctx = _registry.substitute("torch", _NoopBackend()) if backend == NOOP else contextlib.nullcontext()
        with ctx:
            for op in ops:
                fn = host_call(op, backend, inputs)
                for _ in range(20):
                    fn()
                    with fops.custom_op_path():
                        fn()
                direct, custom = [], []
                for _ in range(repeats):
                    direct.append(_host_times(fn, calls))
                    with fops.custom_op_path():
                        custom.append(_host_times(fn, calls))
                d = statistics.median(c for c, _ in direct)
                c = statistics.median(c for c, _ in custom)
                rows.append({"kind": "host", "op": op, "backend": backend,
                             "size": "x".join(map(str, shape)), "device": device,
                             "threads": torch.get_num_threads() if device == "cpu" else None,
                             "direct_us": d, "custom_us": c,
                             "direct_us_wall_min": min(w for _, w in direct),
                             "custom_us_wall_min": min(w for _, w in custom),
                             "saving": c / d})
    return rows


def format_host_table(rows: List[dict]) -> str:
    """A plain-text table of host_table rows."""
    rows = [r for r in rows if r.get("kind") == "host"]
    if not rows:
        return "(no host-time rows)"
    head = ["op", "backend", "direct µs", "wall min", "custom op µs", "wall min", "custom/direct"]
    lines = [head]
    for r in rows:
        lines.append([r["op"], r["backend"], f"{r['direct_us']:.1f}", f"{r['direct_us_wall_min']:.1f}",
                      f"{r['custom_us']:.1f}", f"{r['custom_us_wall_min']:.1f}", f"{r['saving']:.1f}x"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    thr = f", {rows[0]['threads']} threads" if rows[0].get("threads") else ""
    out.append(f"(host time per call, {rows[0]['size']} {rows[0]['device']}{thr}: median thread CPU µs "
               f"per call, kernel included; 'wall min' = the fastest window's wall µs; 'custom op' = "
               f"the same call through torch.ops.fastadv.*, as under tracing/compile/capture)")
    return "\n".join(out)


def format_table(rows: List[dict]) -> str:
    """A plain-text table of ops_table rows (and, below it, the host-time rows)."""
    host = [r for r in rows if r.get("kind") == "host"]
    rows = [r for r in rows if r.get("kind") != "host"]
    if not rows:
        return format_host_table(host) if host else "(no rows)"
    text = _format_speed_table(rows)
    return text + ("\n\n" + format_host_table(host) if host else "")


def _format_speed_table(rows: List[dict]) -> str:
    gpu = any("frac_of_copy" in r for r in rows)
    est = any("min_over_est" in r for r in rows)
    head = ["size", "op", "backend", "dtype", "ms", "ms min", "vs eager", "GB/s"]
    if gpu:
        head += ["% of copy_"]
    if est:
        head += ["min/est DRAM", "L2 schedule"]
    lines = [head]
    for r in rows:
        line = [r["size"], r["op"], r["backend"], r["dtype"], f"{r['ms']:.3f}", f"{r['ms_min']:.3f}",
                f"{r['speedup']:.2f}x", f"{r['gb_s']:.1f}"]
        if gpu:
            line.append(f"{100 * r['frac_of_copy']:.0f}%" if "frac_of_copy" in r else "")
        if est:
            line += [f"{100 * r['min_over_est']:.0f}%", r["l2_schedule"]] if "min_over_est" in r else ["", ""]
        lines.append(line)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    dev = rows[0]["device"]
    thr = f", {rows[0]['threads']} threads" if rows[0].get("threads") else ""
    out.append(f"({dev}{thr}; median of interleaved repeats; 'vs eager' = eager median / median; "
               f"eager = the torchattacks per-step sequence"
               + ("; min/est DRAM = the ~4-tensor-size minimum over the L2 schedule's estimated "
                  "traffic, an estimate)" if est else ")"))
    return "\n".join(out)


if __name__ == "__main__":  # python -m fastadv.bench_ops [--host]
    import sys
    if "--host" in sys.argv:
        torch.set_num_threads(1)
        print(format_host_table(host_table()))
    else:
        print(format_table(ops_table(threads=2 if not torch.cuda.is_available() else None)))
