"""pytest-benchmark: each fused op on each ready backend against the eager sequence
torchattacks runs per step (sign, mul, add, sub, clamp, add, clamp for PGD).

    python -m pytest benchmarks/bench_ops.py --benchmark-enable          # 2 CPU threads
    FASTADV_BENCH_BIG=1 python -m pytest benchmarks/bench_ops.py --benchmark-enable
    python benchmarks/bench_ops.py [--threads 2] [--big]                 # the comparison table
    python benchmarks/bench_ops.py --host                                # host time per call only

The timing logic lives in fastadv.bench_ops (``fastadv bench ops`` uses it too);
``run_ops_table`` is the importable entry point for scripts.
"""
import argparse
import contextlib
import os
import sys

import pytest
import torch

from fastadv import bench_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
THREADS = int(os.environ.get("FASTADV_BENCH_THREADS", "2"))  # conftest.py applies it per test


def run_ops_table(sizes=None, backends=None, threads=THREADS, device=None):
    """Rows of fastadv.bench_ops.ops_table (see there)."""
    return bench_ops.ops_table(sizes=sizes, backends=backends, threads=threads, device=device)


def _backends():
    return ["eager"] + bench_ops.ready_backends(DEVICE)


@pytest.mark.parametrize("size", bench_ops.default_sizes(DEVICE), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", bench_ops.OPS)
@pytest.mark.parametrize("backend", _backends())
def test_op(benchmark, size, op, backend):
    inputs = bench_ops.make_inputs(size, DEVICE)
    call = bench_ops.make_call(op, backend, inputs)
    benchmark.group = f"{op} {'x'.join(map(str, size))}"
    benchmark.extra_info.update(bench_ops.l2_traffic(op, backend, inputs))  # triton L2 on a GPU
    if DEVICE == "cuda":
        def fn():
            call()
            torch.cuda.synchronize()
        benchmark(fn)
    else:
        benchmark(call)


def _host_backends():
    names = bench_ops.ready_backends(DEVICE)
    return names + ([bench_ops.NOOP] if DEVICE == "cpu" else [])


@pytest.mark.parametrize("path", ["direct", "custom_op"])
@pytest.mark.parametrize("op", bench_ops.HOST_OPS)
@pytest.mark.parametrize("backend", _host_backends())
def test_host_time(benchmark, backend, op, path):
    """Host time per call on a tiny batch (4x3x8x8): the direct eager path, and the same call
    through the registered custom op (as under tracing/compile/capture). On a GPU nothing
    synchronises: this is the time the host spends issuing the op."""
    from fastadv import ops
    from fastadv.ops import _registry

    call = bench_ops.host_call(op, backend, bench_ops.make_inputs(bench_ops.HOST_SHAPE, DEVICE))
    benchmark.group = f"host {op}"
    noop = _registry.substitute("torch", bench_ops._NoopBackend()) if backend == bench_ops.NOOP else None
    with noop or contextlib.nullcontext(), ops.custom_op_path() if path == "custom_op" else contextlib.nullcontext():
        benchmark(call)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--big", action="store_true", help="add 224x224 batches on CPU")
    p.add_argument("--host", action="store_true", help="only the host time per call (tiny batch)")
    a = p.parse_args()
    if a.host:
        torch.set_num_threads(a.threads)
        print(bench_ops.format_host_table(bench_ops.host_table()))
        sys.exit(0)
    if a.big:
        os.environ["FASTADV_BENCH_BIG"] = "1"
    print(bench_ops.format_table(run_ops_table(threads=a.threads)))
    sys.exit(0)
