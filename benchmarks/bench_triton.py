"""Triton linf_step / l2_step against the eager sequence torchattacks runs, and against copy bandwidth.

Run on a CUDA machine (skipped without one)::

    pytest benchmarks/bench_triton.py --benchmark-enable -s [--benchmark-json out.json]

Rows, per batch shape (float32):
  ``triton``   the public op, ``fastadv.ops.linf_step(..., backend="triton")`` (custom-op
               dispatch, argument checks and the output allocation included);
  ``kernel``   the backend's launcher alone, writing into a preallocated output;
  ``eager``    torchattacks' update as separate PyTorch ops (7 kernels for L∞, ~13 for L2);
  ``prev``     (l2_step only) the launcher on the L2 schedule it had before ``l2_schedule``:
               one program a sample up to 8192 elements, else three passes over the whole
               batch (~8 tensor-sizes of DRAM traffic at 3x224x224), an A/B on one GPU.
pytest-benchmark times a row as ``CALLS`` back-to-back calls and one synchronize.
Each row's ``extra_info`` holds the figures to report, timed with CUDA events:
``us_per_call``; ``gb_per_s`` counting the bytes a fused update must move (read
x_adv, x_nat, grad; write out: 4 tensors); ``copy_fraction``, that rate over the
rate of ``dst.copy_(src)`` moving the same number of bytes, i.e. the fraction of the
~4-tensor-size minimum's time the op reaches; ``speedup_vs_eager``. L2 rows of the triton
backend add the schedule ``l2_schedule`` picks for this GPU (kind, waves, launches) and
its DRAM estimate: ``est_dram_bytes``, ``min_over_est`` (the minimum over the estimate:
1.0 when every input is read once, 0.5 for three sweeps from memory) and
``est_gb_per_s`` (the DRAM rate that estimate implies). Estimates, not counters.
Targets (reported, not asserted): copy_fraction >= 0.85 and speedup_vs_eager >= 5
for the triton rows. A summary table prints at the end of the module (use ``-s``).
"""
import contextlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(128, 3, 32, 32), (512, 3, 32, 32), (128, 3, 64, 64), (64, 3, 224, 224), (256, 3, 224, 224)]
ALPHA, EPS = 2 / 255, 8 / 255
L2_ALPHA, L2_EPS = 0.1, 0.5
CALLS = 20  # calls per pytest-benchmark round
TARGET_COPY_FRACTION, TARGET_SPEEDUP = 0.85, 5.0

_summary = []


# ------------------------------------------------------------ the baselines
def eager_linf(x_adv, x_nat, grad, alpha=ALPHA, eps=EPS):
    """torchattacks PGD's update, op by op."""
    adv = x_adv + alpha * grad.sign()
    delta = torch.clamp(adv - x_nat, min=-eps, max=eps)
    return torch.clamp(x_nat + delta, min=0, max=1)


def eager_l2(x_adv, x_nat, grad, alpha=L2_ALPHA, eps=L2_EPS):
    """torchattacks PGDL2's update, op by op."""
    b = grad.shape[0]
    grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10
    grad = grad / grad_norms.view(b, 1, 1, 1)
    adv = x_adv + alpha * grad
    delta = adv - x_nat
    delta_norms = torch.norm(delta.view(b, -1), p=2, dim=1)
    factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
    delta = delta * factor.view(-1, 1, 1, 1)
    return torch.clamp(x_nat + delta, min=0, max=1)


# ------------------------------------------------------------------ helpers
def _inputs(shape, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    x_nat = torch.rand(shape, generator=g, device="cuda", dtype=dtype)
    x_adv = (x_nat + 0.01 * torch.randn(shape, generator=g, device="cuda", dtype=dtype)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
    return x_adv, x_nat, grad


def _us_per_call(fn, reps=100, warmup=10):
    """Median over 5 runs of ``reps`` back-to-back calls, in microseconds a call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    return sorted(times)[len(times) // 2]


_copy_cache = {}
_eager_cache = {}


def _copy_us(nbytes):
    """Time of ``dst.copy_(src)`` that reads nbytes/2 and writes nbytes/2."""
    if nbytes not in _copy_cache:
        src = torch.rand(nbytes // 8, device="cuda")  # float32: nbytes/2 read, nbytes/2 written
        dst = torch.empty_like(src)
        _copy_cache[nbytes] = _us_per_call(lambda: dst.copy_(src))
    return _copy_cache[nbytes]


def _callable(op, impl, x_adv, x_nat, grad):
    from fastadv import ops
    from fastadv.ops import _triton_backend as tb

    alpha, eps = (ALPHA, EPS) if op == "linf_step" else (L2_ALPHA, L2_EPS)
    if impl == "eager":
        base = eager_linf if op == "linf_step" else eager_l2
        return lambda: base(x_adv, x_nat, grad)
    if impl == "triton":
        fn = getattr(ops, op)
        return lambda: fn(x_adv, x_nat, grad, alpha, eps, backend="triton")
    out = torch.empty_like(x_adv)
    launch = getattr(tb.backend, op)
    if impl == "prev":
        per_sample = x_adv[0].numel()

        def prev():
            with tb.previous_l2_schedule(per_sample):
                launch(out, x_adv, x_nat, grad, alpha, eps, 0.0, 1.0)
        return prev
    return lambda: launch(out, x_adv, x_nat, grad, alpha, eps, 0.0, 1.0)


def _schedule_info(op, impl, x_adv, grad):
    """The L2 schedule a triton row runs and its DRAM estimate (nothing for other rows)."""
    if op != "l2_step" or impl == "eager":
        return {}
    from fastadv.ops import _triton_backend as tb

    with tb.previous_l2_schedule(x_adv[0].numel()) if impl == "prev" else contextlib.nullcontext():
        s = tb.schedule_for(x_adv, grad)
    return {"schedule": f"{s.kind} {s.tiles}/sample {s.waves} waves {s.launches} launches",
            "est_dram_bytes": s.est_dram_bytes, "min_dram_bytes": s.min_dram_bytes,
            "min_over_est": s.min_dram_bytes / s.est_dram_bytes}


@pytest.fixture(scope="module", autouse=True)
def summary_table():
    yield
    if not _summary:
        return
    name = torch.cuda.get_device_name()
    print(f"\n\nfastadv triton update ops on {name} (float32; bytes = read x_adv, x_nat, grad + write out)")
    print(f"{'op':10} {'shape':18} {'impl':7} {'us/call':>9} {'GB/s':>8} {'of copy':>8} {'vs eager':>9} "
          f"{'min/est':>8}  schedule (estimated DRAM bytes: min/est)")
    for r in _summary:
        est = f"{r['min_over_est']:8.0%}" if "min_over_est" in r else " " * 8
        print(f"{r['op']:10} {r['shape']:18} {r['impl']:7} {r['us_per_call']:9.1f} {r['gb_per_s']:8.0f} "
              f"{r['copy_fraction']:8.0%} {r['speedup_vs_eager']:8.2f}x {est}  {r.get('schedule', '')}")
    print(f"targets: >= {TARGET_COPY_FRACTION:.0%} of copy bandwidth, >= {TARGET_SPEEDUP:g}x eager; "
          "min/est is the L2 schedule's estimate (100%: ~4 tensor-sizes), not a measurement")


# -------------------------------------------------------------------- rows
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "kernel", "prev", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["linf_step", "l2_step"])
def test_update(benchmark, op, shape, impl):
    if impl == "prev" and op != "l2_step":
        pytest.skip("prev: the L2 schedule before l2_schedule; L∞ has one schedule")
    x_adv, x_nat, grad = _inputs(shape)
    fn = _callable(op, impl, x_adv, x_nat, grad)
    fn()  # compile outside the timing

    def calls():
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"{op} {'x'.join(map(str, shape))}"
    benchmark.pedantic(calls, rounds=10, iterations=1, warmup_rounds=2)

    nbytes = 4 * x_adv.numel() * x_adv.element_size()
    us = _us_per_call(fn)
    if impl == "eager":
        _eager_cache[(op, shape)] = us
    elif (op, shape) not in _eager_cache:
        _eager_cache[(op, shape)] = _us_per_call(_callable(op, "eager", x_adv, x_nat, grad))
    eager_us = _eager_cache[(op, shape)]
    row = {
        "op": op, "shape": "x".join(map(str, shape)), "impl": impl,
        "us_per_call": us,
        "gb_per_s": nbytes / us / 1e3,
        "copy_fraction": _copy_us(nbytes) / us,
        "speedup_vs_eager": eager_us / us,
        "copy_gb_per_s": nbytes / _copy_us(nbytes) / 1e3,
        "device": torch.cuda.get_device_name(),
    }
    row.update(_schedule_info(op, impl, x_adv, grad))
    if "est_dram_bytes" in row:
        row["est_gb_per_s"] = row["est_dram_bytes"] / us / 1e3
    benchmark.extra_info.update(row)
    _summary.append(row)
