"""Time-to-robustness of fastadv's training methods on the embedded MNIST-5k (ε = 0.3, CPU).

    python benchmarks/bench_train.py [--threads 2] [--epochs 15] [--quick]    # the table
    python benchmarks/bench_train.py --threads 1 --epochs 15 --interleave --seed 1 --only ...
                                    # rows trained round-robin: fair time ratios under load
    python benchmarks/bench_train.py --cost [--threads 2]                      # per-batch cost only
    python benchmarks/bench_train.py --cost --device cuda --model preact_resnet18 --amp bf16
                                    # the GPU row: each method's epoch time ÷ the standard epoch
    python -m pytest benchmarks/bench_train.py --benchmark-enable               # one step per method

Same SmallCNN(width=16), Adam(1e-3), batches of 64, seed, epochs and ε warm-up for every
method; the trained models are evaluated with PGD-40 on 1,000 held-out digits. The
logic lives in fastadv.bench_train (``fastadv bench train`` prints the same table).
Results: benchmarks/RESULTS_train_cpu.md.
"""
import argparse
import os
import sys

import pytest
import torch

from fastadv import bench_train, models
from fastadv.train import AdversarialTrainer

THREADS = int(os.environ.get("FASTADV_BENCH_THREADS", "2"))  # conftest.py applies it per test
METHODS = ["standard", "pgd", "fgsm_rs", "n_fgsm", "gradalign", "free", "yopo", "atta", "trades", "mart"]


@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, method):
    """One training step (batch of 64 MNIST-shaped inputs) of each method."""
    torch.manual_seed(0)
    model = models.SmallCNN(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kw = {"dataset_size": 64} if method == "atta" else {}
    tr = AdversarialTrainer(model, opt, method=method, eps=0.3, seed=0, channels_last=True,
                            attack_amp="bf16", **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    idx = torch.arange(64)
    tr.step(x, y, idx)
    benchmark.group = "train step, MNIST 64"
    benchmark(tr.step, x, y, idx)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--cost" in argv:
        p = argparse.ArgumentParser()
        p.add_argument("--cost", action="store_true")
        p.add_argument("--threads", type=int, default=THREADS)
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        p.add_argument("--model", default="small_cnn", choices=["small_cnn", "preact_resnet18"],
                       help="preact_resnet18: CIFAR-shaped 3x32x32 batches (the GPU row of the issue)")
        p.add_argument("--batch-size", type=int, default=None, help="default 64 (small_cnn), 512 (resnet)")
        p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="training precision")
        p.add_argument("--attack-amp", default="bf16", choices=["same", "fp32", "bf16", "fp16"])
        a = p.parse_args(argv)
        if a.model == "preact_resnet18":
            model_fn, shape, bs = models.PreActResNet18, (3, 32, 32), a.batch_size or 512
        else:
            model_fn, shape, bs = (lambda: models.SmallCNN(width=16)), (1, 28, 28), a.batch_size or 64
        rows = bench_train.cost_table(model_fn=model_fn, shape=shape, batch_size=bs, eps=8 / 255 if
                                      a.model == "preact_resnet18" else 0.3, device=a.device,
                                      threads=a.threads if a.device == "cpu" else None,
                                      repeats=a.repeats, amp=a.amp, attack_amp=a.attack_amp,
                                      channels_last=True)
        print(f"{a.model}, batch {bs}, {a.device}, amp={a.amp}, attack_amp={a.attack_amp}")
        print(bench_train.format_cost_table(rows))
        return 0
    return bench_train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
