"""pytest-benchmark: fastadv's attacks against their baselines (torchattacks on the same model,
batch and budget; or fastadv without the feature a row is about), one group per row.

    python -m pytest benchmarks/bench_attacks.py --benchmark-enable            # 2 CPU threads
    python -m pytest benchmarks/bench_attacks.py --benchmark-enable -k "fp32"
    python benchmarks/bench_attacks.py [--threads 2] [--quick]                  # the table

The cases, models and timing live in fastadv.bench_attacks (``fastadv bench attacks`` prints
the same table, with the floor ratio and robust accuracy of each side).
"""
import argparse
import os
import sys

import pytest
import torch

from fastadv import bench_attacks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
THREADS = int(os.environ.get("FASTADV_BENCH_THREADS", "2"))  # conftest.py applies it per test
CASES = bench_attacks.default_cases(DEVICE, quick=os.environ.get("FASTADV_BENCH_QUICK") == "1")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("side", ["fastadv", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "_") for c in CASES])
def test_attack(benchmark, case, side):
    maker = case.fastadv if side == "fastadv" else case.baseline
    if maker is None:
        pytest.skip("no baseline here (torchattacks not installed)")
    model, x, y = bench_attacks.bench_model(case.model, case.batch, torch.device(DEVICE))
    fn = maker(model)
    fn(x, y)  # warm-up, graph capture
    _sync()
    benchmark.group = case.name
    benchmark.extra_info.update(baseline=case.baseline_name, steps=case.steps, batch=case.batch,
                                model=case.model, side=side)

    def call():
        out = fn(x, y)
        _sync()
        return out

    x_adv = benchmark.pedantic(call, rounds=3, iterations=1)
    with torch.no_grad():
        benchmark.extra_info["robust_accuracy"] = (model(x_adv).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="+")
    a = p.parse_args(argv)
    rows = bench_attacks.attacks_table(threads=a.threads, quick=a.quick, repeats=a.repeats,
                                       names=a.only)
    print(bench_attacks.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
