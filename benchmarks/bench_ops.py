"""pytest-benchmark: each fused op on each ready backend against the eager sequence
torchattacks runs per step (sign, mul, add, sub, clamp, add, clamp for PGD).

    python -m pytest benchmarks/bench_ops.py --benchmark-enable          # 2 CPU threads
    FASTADV_BENCH_BIG=1 python -m pytest benchmarks/bench_ops.py --benchmark-enable
    python benchmarks/bench_ops.py [--threads 2] [--big]                 # the comparison table

The timing logic lives in fastadv.bench_ops (``fastadv bench ops`` uses it too);
``run_ops_table`` is the importable entry point for scripts.
"""
import argparse
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
    call = bench_ops.make_call(op, backend, bench_ops.make_inputs(size, DEVICE))
    benchmark.group = f"{op} {'x'.join(map(str, size))}"
    if DEVICE == "cuda":
        def fn():
            call()
            torch.cuda.synchronize()
        benchmark(fn)
    else:
        benchmark(call)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--big", action="store_true", help="add 224x224 batches on CPU")
    a = p.parse_args()
    if a.big:
        os.environ["FASTADV_BENCH_BIG"] = "1"
    print(bench_ops.format_table(run_ops_table(threads=a.threads)))
    sys.exit(0)
