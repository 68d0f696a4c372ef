"""Every method makes a small CNN robust on real digits in a short run, without collapsing.

Held-out MNIST-5k digits, L∞ PGD-10 (the trainer's guard on the validation set);
small settings so the whole file stays within a minute on 2 CPU cores. The full
time-to-robustness comparison at ε = 0.3 lives in benchmarks/bench_train.py (and in
the slow test at the end).
"""
import functools

import pytest
import torch

from fastadv import data, models
from fastadv.train import AdversarialTrainer

EPS = 0.2
N_TRAIN = 2000


@functools.lru_cache(maxsize=None)
def _split():
    return data.load_dataset("mnist5k", n_test=1000, seed=0)


def _fit(method, eps=EPS, epochs=2, n_train=N_TRAIN, width=8, warmup=1.0, lr=2e-3, **opts):
    (xtr, ytr), (xte, yte) = _split()
    torch.manual_seed(0)
    model = models.SmallCNN(width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tr = AdversarialTrainer(model, opt, method=method, eps=eps, seed=0, **opts)
    loader = data.make_loader(xtr[:n_train], ytr[:n_train], batch_size=64, indexed=method == "atta")
    val = data.make_loader(xte[:300], yte[:300], batch_size=300, shuffle=False)
    hist = tr.fit(loader, epochs, val_loader=val, guard_size=300, eps_warmup=warmup, verbose=False)
    return tr, hist


@functools.lru_cache(maxsize=None)
def _standard_robust_acc():
    _, hist = _fit("standard")
    return hist[-1]["robust_acc"]


# reduced inner loops where the published ones would dominate the suite's time
CASES = [("fgsm_rs", {}), ("n_fgsm", {}), ("gradalign", {}), ("atta", {}), ("free", {"replays": 2}),
         ("yopo", {"outer": 3, "steps": 2}), ("pgd", {"steps": 3}), ("trades", {"steps": 3}),
         ("mart", {"steps": 3})]


@pytest.mark.parametrize("method,opts", CASES, ids=[c[0] for c in CASES])
def test_method_gains_robustness_on_held_out_digits(method, opts):
    std = _standard_robust_acc()
    assert std < 0.1, f"standard training should not be robust at eps={EPS} (got {std:.1%})"
    _, hist = _fit(method, **opts)
    rob = hist[-1]["robust_acc"]
    assert rob >= 0.2 and rob >= std + 0.15, f"{method}: PGD accuracy {rob:.1%} vs standard {std:.1%}"
    assert hist[-1]["val_clean_acc"] > 0.6
    assert not hist.collapsed


@pytest.mark.parametrize("method", ["fgsm_rs", "n_fgsm"])
def test_no_catastrophic_overfitting_at_recommended_settings(method):
    """Single-step methods at their published step sizes, at a radius where they are
    recommended (ε well inside the data's margin): robustness keeps rising epoch after epoch."""
    _, hist = _fit(method, eps=0.1, epochs=3, warmup=0.0)
    curve = [r["robust_acc"] for r in hist]
    assert not hist.collapsed
    assert curve[-1] >= max(curve) - 0.05, curve
    assert curve[-1] >= 0.5, curve


@pytest.mark.slow
def test_time_to_robustness_eps03_atta_vs_pgd10():
    """The benchmark's claim in small: at ε = 0.3, ATTA-2 comes within a few points of
    PGD-10 AT's PGD accuracy (same model, epochs, optimizer) for far less training time;
    FGSM-RS-trained models are clearly more robust than standard ones."""
    kw = dict(eps=0.3, epochs=5, n_train=4000, width=16, warmup=2.0, lr=1e-3,
              channels_last=True, attack_amp="bf16")
    _, h_pgd = _fit("pgd", **kw)
    _, h_atta = _fit("atta", steps=2, **kw)
    _, h_fgsm = _fit("fgsm_rs", **kw)
    _, h_std = _fit("standard", **kw)
    pgd, atta = h_pgd[-1]["robust_acc"], h_atta[-1]["robust_acc"]
    assert atta >= pgd - 0.04, (atta, pgd)
    assert sum(r["time"] for r in h_atta) < 0.5 * sum(r["time"] for r in h_pgd)
    assert h_fgsm[-1]["robust_acc"] >= h_std[-1]["robust_acc"] + 0.05
    assert not (h_pgd.collapsed or h_atta.collapsed)
