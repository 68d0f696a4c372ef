"""The attack benchmark: fastadv against torchattacks on the same model, batch and budget.

``attacks_table(device=None, threads=2, quick=False, repeats=3, cases=None) -> rows`` and
``format_table(rows)`` are what ``fastadv bench attacks`` and ``benchmarks/bench_attacks.py``
print. Each row times one fastadv configuration and its baseline (torchattacks, or fastadv
without the feature the row is about) interleaved repeat by repeat, and reports the median
seconds, the speedup (baseline / fastadv), the floor ratio (attack time / (K × one eager
fp32 forward + input-backward of the bare model); below 1 only by layout or precision) and
the robust accuracy each side leaves, measured in float32 on the same points. Minimum-norm
attacks (C&W, DeepFool, EAD, JSMA, FMN) also report the median size of their perturbations
on the points both sides fool (smaller is stronger; L2, or the row's ``size_norm``: L1 for
EADL1, L0 for JSMA); their ``steps`` is the iteration budget.

The models are trained here on the embedded MNIST-5k (28×28, or padded to 3×32×32 for the
CIFAR-shaped rows), once, and cached in ``FASTADV_BENCH_CACHE`` or ``~/.cache/fastadv/bench``.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Case", "default_cases", "catalogue_cases", "attacks_table", "format_table", "floor_time", "bench_model"]

CACHE = os.environ.get("FASTADV_BENCH_CACHE", os.path.expanduser("~/.cache/fastadv/bench"))


# ------------------------------------------------------------------ models
def _mnist_as(shape: str, device: torch.device):
    """MNIST-5k train/test tensors, as 1×28×28 ("mnist") or padded and tiled to 3×32×32."""
    from . import data
    (xtr, ytr), (xte, yte) = data.load_dataset("mnist5k", n_test=1000, seed=0)
    if shape == "cifar":
        xtr, xte = data.as_cifar_shape(xtr), data.as_cifar_shape(xte)
    return (xtr.to(device), ytr.to(device)), (xte.to(device), yte.to(device))


_MODELS = {
    # name: (builder, input shape, training epochs)
    "mnist_cnn": (lambda: _models().SmallCNN(width=16), "mnist", 3),
    "cnn32": (lambda: _models().SmallCNN(in_channels=3, input_size=32, width=32), "cifar", 1),
    "preact_resnet18": (lambda: _models().PreActResNet18(), "cifar", 1),
}


def _models():
    from . import models
    return models


# what the table's model names are, for its footnote
MODEL_NOTES = {
    "mnist_cnn": "SmallCNN(width=16) on 1×28×28 MNIST-5k digits, 3 epochs of standard training",
    "cnn32": "SmallCNN(width=32) on MNIST-5k digits padded and tiled to 3×32×32 (CIFAR-shaped), "
             "1 epoch of standard training",
    "preact_resnet18": "PreAct ResNet-18 on MNIST-5k digits padded and tiled to 3×32×32, 1 epoch",
}


def _train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int = 0,
           on_batch: Optional[Callable[[], None]] = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if on_batch is not None:
                on_batch()
    model.eval()


def _cache_path(name: str) -> str:
    return os.path.join(CACHE, f"{name}-torch{torch.__version__}.pt")


def _training_bar(name: str, total: int, progress: bool, log: Callable[[str], None]):
    """(on_batch, close): a tqdm bar over the training batches, or a line every ~10%."""
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=f"training {name}", unit="batch", leave=False, dynamic_ncols=True)
            return (lambda: bar.update(1)), bar.close
        except ImportError:
            pass
    done = [0]

    def on_batch():
        done[0] += 1
        if done[0] % max(1, total // 10) == 0 or done[0] == total:
            log(f"  training {name}: {done[0]}/{total} batches")
    return on_batch, (lambda: None)


def bench_model(name: str, batch: int, device: torch.device, progress: bool = False,
                log: Optional[Callable[[str], None]] = None) -> Tuple[nn.Module, Tensor, Tensor]:
    """A zoo model trained on MNIST-5k (cached) and ``batch`` test points for it; training
    (the first run only) is announced through ``log`` with a progress bar if ``progress``."""
    if name not in _MODELS:
        raise ValueError(f"model: expected one of {sorted(_MODELS)}, got {name!r}")
    build, shape, epochs = _MODELS[name]
    (xtr, ytr), (xte, yte) = _mnist_as(shape, device)
    path = _cache_path(name)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)                     # a seeded init; the caller's RNG is put back
        model = build().to(device)
        if os.path.exists(path):
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        else:
            total = epochs * ((len(xtr) + 63) // 64)
            if log is not None:
                log(f"training {name} once ({MODEL_NOTES.get(name, 'a zoo model')}); cached in {path}")
            on_batch, close = _training_bar(name, total, progress, log or (lambda m: None))
            t0 = time.perf_counter()
            try:
                _train(model, xtr, ytr, epochs, on_batch=on_batch if (progress or log) else None)
            finally:
                close()
            if log is not None:
                log(f"  trained {name} in {time.perf_counter() - t0:.0f} s")
            os.makedirs(CACHE, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
    model.eval()
    reps = (batch + len(xte) - 1) // len(xte)
    x, y = xte.repeat((reps,) + (1,) * (xte.dim() - 1))[:batch], yte.repeat(reps)[:batch]
    return model, x.contiguous(), y.contiguous()


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> Tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def floor_time(model: nn.Module, x: Tensor, y: Tensor, repeats: int = 5) -> float:
    """Median seconds of one eager fp32 forward + input-backward of the bare model (input
    as given, parameters frozen, CE summed): the unit of the floor ratio."""
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        def once():
            xx = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xx), y, reduction="sum"), xx)
            return g
        for _ in range(2):
            once()
        return statistics.median(_timed(once, x.device)[0] for _ in range(repeats))
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


def _robust(model: nn.Module, x_adv: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def _size(d: Tensor, norm: str) -> Tensor:
    f = d.flatten(1).float()
    if norm == "L0":
        return (f != 0).sum(1).float()
    if norm == "L1":
        return f.abs().sum(1)
    if norm == "Linf":
        return f.abs().amax(1)
    return f.norm(dim=1)


def _median_size_on_common(model: nn.Module, x: Tensor, y: Tensor, advs: Sequence[Tensor],
                           norm: str = "L2") -> List[Optional[float]]:
    """Each side's median perturbation size (in ``norm``) on the points every side fools
    (None if none)."""
    with torch.no_grad():
        both = model(x).argmax(1) == y
        for a in advs:
            both &= model(a).argmax(1) != y
    if not bool(both.any()):
        return [None] * len(advs)
    return [_size(a - x, norm)[both].median().item() for a in advs]


def _median_l2_on_common(model: nn.Module, x: Tensor, y: Tensor, advs: Sequence[Tensor]) -> List[Optional[float]]:
    """Each side's median L2 perturbation on the points every side fools (None if none)."""
    return _median_size_on_common(model, x, y, advs, "L2")


# ------------------------------------------------------------------- cases
Maker = Callable[[nn.Module], Callable[[Tensor, Tensor], Tensor]]


@dataclass
class Case:
    """One row: a fastadv attack and the baseline it is timed against."""
    name: str
    model: str
    batch: int
    steps: int                        # K of the floor ratio (gradient steps per sample)
    fastadv: Maker
    baseline_name: str
    baseline: Optional[Maker]         # None: no baseline (e.g. torchattacks missing)
    device: str = "any"               # "cpu", "cuda" or "any"
    min_norm: bool = False            # a minimum-norm attack (C&W, DeepFool): also report the
    #                                   median size of the perturbations, on points both sides fool
    size_norm: str = "L2"             # the norm that size is measured in ("L0", "L1", "L2", "Linf")


def _torchattacks():
    try:
        import torchattacks  # noqa: F401  (a test/benchmark extra)
        return torchattacks
    except Exception:  # absent, or a broken optional import of it
        return None


def _ta(cls: str, **kw) -> Optional[Maker]:
    ta = _torchattacks()
    if ta is None:
        return None

    def make(model):
        atk = getattr(ta, cls)(model, **kw)

        def call(x, y):
            # torchattacks draws its start from the global RNG (OnePixel's and Pixle's from
            # numpy's): give it a fork of its own, seeded, and put numpy's back afterwards
            import numpy as np
            state = np.random.get_state()
            try:
                with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                    torch.manual_seed(0)
                    np.random.seed(0)
                    return atk(x, y)
            finally:
                np.random.set_state(state)
        return call
    make.kwargs = dict(kw)   # the table reads the budget from here
    return make


def _fa(cls: str, **kw) -> Maker:
    def make(model):
        from . import attacks
        return getattr(attacks, cls)(model, seed=0, **kw)
    make.kwargs = dict(kw)   # the table reads the budget from here
    return make


def _sequential(cls: str, runs: int, **kw) -> Maker:
    """``runs`` separate fastadv runs, the worst case kept per sample (restarts done by hand)."""
    def make(model):
        from . import attacks
        atks = [getattr(attacks, cls)(model, seed=i, **kw) for i in range(runs)]

        def call(x, y):
            best, fooled = None, None
            for atk in atks:
                res = atk.run(x, y)
                if best is None:
                    best, fooled = res.x_adv.clone(), res.success.clone()
                else:
                    take = res.success & ~fooled
                    best[take] = res.x_adv[take]
                    fooled |= res.success
            return best
        return call
    make.kwargs = dict(kw)
    return make


def catalogue_cases(model: str, batch: int, device: str, steps: int = 10,
                    min_norm_model: Optional[str] = None, min_norm_batch: Optional[int] = None) -> List[Case]:
    """Rows for the rest of torchattacks' catalogue (BIM ... PGDRSL2, SparseFool,
    OnePixel, Pixle, SPSA, EADL1, EADEN, JSMA) against torchattacks, at its defaults (the
    last iterate, on both sides), and FMN-L2 against torchattacks' C&W. A row's
    ``steps`` counts the forward+backward passes per point (SI's scale copies, VMI/VNI's
    neighbours, EOT's samples, PGDRS's noise draws included); for the minimum-norm rows it
    is the budget (EAD stops its search steps early, JSMA its points once fooled).

    The minimum-norm rows run on ``min_norm_model`` with ``min_norm_batch`` points (default:
    ``model``, ``batch``): torchattacks' JSMA takes ten backward passes and an F²-pair map per
    image and step, minutes for a batch of 3×32×32 images. ``steps`` scales their budgets
    (``steps=10``: torchattacks' defaults; EAD's iterations are 10·steps, JSMA's gamma
    0.01·steps, FMN's and C&W's steps 10·steps)."""
    linf = dict(eps=8 / 255, alpha=2 / 255, steps=steps)
    k = steps
    rows = [
        (f"BIM-{k}", "BIM", linf, k), (f"RFGSM-{k}", "RFGSM", linf, k),
        ("FFGSM", "FFGSM", dict(eps=8 / 255), 1), (f"TPGD-{k}", "TPGD", linf, k),
        (f"EOTPGD-{k} eot_iter=2", "EOTPGD", linf, 2 * k), (f"UPGD-{k}", "UPGD", linf, k),
        (f"Jitter-{k}", "Jitter", linf, k), (f"MIFGSM-{k}", "MIFGSM", linf, k),
        (f"NIFGSM-{k}", "NIFGSM", linf, k), (f"SINIFGSM-{k} m=5", "SINIFGSM", linf, 5 * k),
        (f"VMIFGSM-{k} N=5", "VMIFGSM", linf, 6 * k), (f"VNIFGSM-{k} N=5", "VNIFGSM", linf, 6 * k),
        (f"DIFGSM-{k}", "DIFGSM", linf, k), (f"TIFGSM-{k}", "TIFGSM", linf, k),
        (f"PGDRS-{k} x5 noise", "PGDRS", linf, 5 * k),
        (f"PGDRSL2-{k} x5 noise", "PGDRSL2", dict(eps=0.5, alpha=0.1, steps=steps), 5 * k),
    ]
    cases = [Case(name, model, batch, passes, _fa(cls, **kw), f"torchattacks.{cls}", _ta(cls, **kw), device)
             for name, cls, kw, passes in rows]
    # L0 and query-only attacks. Their ``steps`` counts model passes per point at most: for
    # SparseFool one 10-class DeepFool step and one normal per step (a lower bound: DeepFool
    # may take more); for the query attacks forwards, not forward+backward passes.
    n = max(1, k // 5)
    spsa = dict(eps=8 / 255, nb_iter=n, nb_sample=32, max_batch_size=32)
    cases += [
        Case(f"SparseFool-{k}", model, batch, 11 * k, _fa("SparseFool", steps=k), "torchattacks.SparseFool",
             _ta("SparseFool", steps=k), device, min_norm=True, size_norm="L0"),
        Case(f"OnePixel-{k}", model, batch, 10 * (k + 1), _fa("OnePixel", steps=k), "torchattacks.OnePixel",
             _ta("OnePixel", steps=k), device),
        Case(f"Pixle {k}x10", model, batch, 10 * k, _fa("Pixle", restarts=k), "torchattacks.Pixle",
             _ta("Pixle", restarts=k), device),
        Case(f"SPSA-{n} x32 samples", model, batch, 64 * n, _fa("SPSA", **spsa), "torchattacks.SPSA",
             _ta("SPSA", **spsa), device),
    ]
    mn_model = min_norm_model or model
    mn_batch = min_norm_batch or batch
    feats = 28 * 28 if _MODELS.get(mn_model, (None, "mnist"))[1] == "mnist" else 3 * 32 * 32
    it = 10 * k
    gamma = min(1.0, 0.01 * k)
    cw = dict(c=10.0, kappa=0.0, steps=it, lr=0.05)
    for name, cls, kw, passes, norm in [
            (f"EADL1 9x{it}", "EADL1", dict(max_iterations=it), 9 * it, "L1"),
            (f"EADEN 9x{it}", "EADEN", dict(max_iterations=it), 9 * it, "L2"),
            (f"JSMA gamma={gamma:g}", "JSMA", dict(gamma=gamma), 2 * math.ceil(feats * gamma / 2), "L0")]:
        cases.append(Case(name, mn_model, mn_batch, passes, _fa(cls, **kw), f"torchattacks.{cls}",
                          _ta(cls, **kw), device, min_norm=True, size_norm=norm))
    # FMN is not in torchattacks: its nearest peer there is C&W L2 (one search step)
    cases.append(Case(f"FMN-L2-{it} (vs C&W-{it})", mn_model, mn_batch, it, _fa("FMN", norm=2, steps=it),
                      "torchattacks.CW", _ta("CW", **cw), device, min_norm=True, size_norm="L2"))
    return cases


def default_cases(device: str, quick: bool = False) -> List[Case]:
    """The rows of ``fastadv bench attacks`` for ``device`` ("cpu" or "cuda")."""
    linf = dict(eps=8 / 255, alpha=2 / 255, steps=10)
    l2 = dict(eps=0.5, alpha=0.1, steps=10)
    cw = dict(c=10.0, kappa=0.0, steps=100, lr=0.05)
    df = dict(steps=50, overshoot=0.02)
    cases: List[Case] = []
    if device == "cpu":
        cases += [
            Case("PGD-10 Linf fp32", "cnn32", 256, 10, _fa("PGD", **linf),
                 "torchattacks.PGD", _ta("PGD", **linf), "cpu"),
            Case("PGD-10 Linf amp=bf16", "cnn32", 256, 10, _fa("PGD", amp="bf16", **linf),
                 "torchattacks.PGD", _ta("PGD", **linf), "cpu"),
            Case("PGD-10 Linf fp32 channels_last=False", "cnn32", 256, 10,
                 _fa("PGD", channels_last=False, **linf), "torchattacks.PGD",
                 _ta("PGD", **linf), "cpu"),
            Case("PGD-L2-10 fp32", "cnn32", 256, 10, _fa("PGDL2", **l2),
                 "torchattacks.PGDL2", _ta("PGDL2", **l2), "cpu"),
            Case("FGSM fp32", "cnn32", 256, 1, _fa("FGSM", eps=linf["eps"]),
                 "torchattacks.FGSM", _ta("FGSM", eps=linf["eps"]), "cpu"),
            Case("PGD-50 Linf eps=0.3 early_stop", "mnist_cnn", 500, 50,
                 _fa("PGD", eps=0.3, alpha=0.015, steps=50, early_stop=True),
                 "fastadv early_stop=False",
                 _fa("PGD", eps=0.3, alpha=0.015, steps=50), "cpu"),
        ]
        if not quick:
            cases += [
                Case("PGD-10 Linf x10 restarts batched", "cnn32", 64, 100,
                     _fa("PGD", restarts=10, **linf), "10 sequential runs",
                     _sequential("PGD", 10, **linf), "cpu"),
                Case("CW-100 L2, 1 search step", "mnist_cnn", 128, 100,
                     _fa("CW", binary_search_steps=1, **cw), "torchattacks.CW", _ta("CW", **cw), "cpu",
                     min_norm=True),
                Case("DeepFool L2", "mnist_cnn", 32, 50, _fa("DeepFool", **df),
                     "torchattacks.DeepFool", _ta("DeepFool", **df), "cpu", min_norm=True),
            ]
            cases += catalogue_cases("cnn32", 128, "cpu", min_norm_model="mnist_cnn", min_norm_batch=32)
    else:
        cases += [
            Case("PGD-10 Linf fp32", "preact_resnet18", 512, 10, _fa("PGD", **linf),
                 "torchattacks.PGD", _ta("PGD", **linf), "cuda"),
            Case("PGD-10 Linf bf16 + cuda_graph", "preact_resnet18", 512, 10,
                 _fa("PGD", amp="bf16", cuda_graph=True, **linf),
                 "torchattacks.PGD", _ta("PGD", **linf), "cuda"),
            Case("PGD-10 Linf fp16 + cuda_graph", "preact_resnet18", 512, 10,
                 _fa("PGD", amp="fp16", cuda_graph=True, **linf),
                 "torchattacks.PGD", _ta("PGD", **linf), "cuda"),
            Case("PGD-10 Linf bf16", "preact_resnet18", 512, 10, _fa("PGD", amp="bf16", **linf),
                 "torchattacks.PGD", _ta("PGD", **linf), "cuda"),
            Case("PGD-L2-10 fp32", "preact_resnet18", 512, 10, _fa("PGDL2", **l2),
                 "torchattacks.PGDL2", _ta("PGDL2", **l2), "cuda"),
            Case("FGSM fp32", "preact_resnet18", 512, 1, _fa("FGSM", eps=linf["eps"]),
                 "torchattacks.FGSM", _ta("FGSM", eps=linf["eps"]), "cuda"),
            Case("PGD-10 Linf x10 restarts batched", "preact_resnet18", 512, 100,
                 _fa("PGD", restarts=10, **linf), "10 sequential runs",
                 _sequential("PGD", 10, **linf), "cuda"),
            Case("PGD-50 Linf eps=0.3 early_stop", "preact_resnet18", 512, 50,
                 _fa("PGD", eps=0.3, alpha=0.015, steps=50, early_stop=True),
                 "fastadv early_stop=False", _fa("PGD", eps=0.3, alpha=0.015, steps=50), "cuda"),
        ]
        if not quick:
            cases += [
                Case("CW-100 L2, 1 search step", "preact_resnet18", 512, 100,
                     _fa("CW", binary_search_steps=1, **cw), "torchattacks.CW", _ta("CW", **cw), "cuda",
                     min_norm=True),
                # torchattacks' DeepFool loops over samples, 10 backward passes each per step
                Case("DeepFool L2", "preact_resnet18", 32, 50, _fa("DeepFool", **df),
                     "torchattacks.DeepFool", _ta("DeepFool", **df), "cuda", min_norm=True),
            ]
            cases += catalogue_cases("preact_resnet18", 256, "cuda", min_norm_model="mnist_cnn",
                                     min_norm_batch=64)
    return cases


# ------------------------------------------------------------------- table
def attacks_table(device: Optional[str] = None, threads: Optional[int] = 2, quick: bool = False,
                  repeats: int = 3, cases: Optional[Sequence[Case]] = None,
                  names: Optional[Sequence[str]] = None, progress: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Run ``cases`` (default: ``default_cases(device, quick)``; ``names`` filters them by
    substring) and return one dict per row.

    Row keys: case, model, batch, steps, device, threads, backend, fastadv_s, baseline,
    baseline_s, speedup, floor_ratio, baseline_floor_ratio, floor_s, robust_fastadv,
    robust_baseline, median_l2_fastadv, median_l2_baseline (minimum-norm rows; else None),
    size_norm, median_size_fastadv, median_size_baseline (minimum-norm rows only: the median
    size in the row's ``size_norm``),
    eps (the budget; None for minimum-norm rows), load (1-minute load average before and
    after the row), cores.

    ``log`` (e.g. ``print``) is told what runs: the models trained on a first run (with a
    progress bar if ``progress``) and each row as it starts."""
    from . import ops
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    cases = list(cases if cases is not None else default_cases(dev.type, quick))
    if names:
        cases = [c for c in cases if any(n.lower() in c.name.lower() for n in names)]
    old_threads = torch.get_num_threads()
    if threads and dev.type == "cpu":
        torch.set_num_threads(int(threads))
    rows: List[dict] = []
    floors: Dict[Tuple[str, int], float] = {}
    say = log or (lambda msg: None)
    todo = [c for c in cases if c.device in ("any", dev.type)]
    untrained = sorted({c.model for c in todo if not os.path.exists(_cache_path(c.model))})
    if untrained:
        say(f"first run: training and caching {', '.join(untrained)} before timing anything (a few "
            f"minutes each on a CPU; later runs load them from {CACHE})")
    try:
        for i, case in enumerate(todo):
            say(f"[{i + 1}/{len(todo)}] {case.name} ({case.model}, {case.batch} points)")
            load_before = _load()
            model, x, y = bench_model(case.model, case.batch, dev, progress=progress, log=log)
            key = (case.model, case.batch)
            if key not in floors:
                floors[key] = floor_time(model, x, y)
            fa = case.fastadv(model)
            fns = {"fastadv": fa}
            if case.baseline is not None:
                fns["baseline"] = case.baseline(model)
            outs = {name: fn(x, y) for name, fn in fns.items()}     # warm-up (and graph capture)
            times: Dict[str, List[float]] = {name: [] for name in fns}
            for _ in range(repeats):
                for name, fn in fns.items():
                    t, outs[name] = _timed(lambda: fn(x, y), dev)
                    times[name].append(t)
            t_fa = statistics.median(times["fastadv"])
            t_base = statistics.median(times["baseline"]) if "baseline" in times else None
            floor = floors[key]
            rows.append({
                "case": case.name, "model": case.model, "batch": case.batch, "steps": case.steps,
                "device": _device_name(dev),
                "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                "backend": ops.resolve_name(None, dev),
                "fastadv_s": t_fa, "baseline": case.baseline_name if t_base is not None else "(none)",
                "baseline_s": t_base, "speedup": (t_base / t_fa) if t_base else None,
                "floor_s": floor, "floor_ratio": t_fa / (case.steps * floor),
                "baseline_floor_ratio": (t_base / (case.steps * floor)) if t_base else None,
                "robust_fastadv": _robust(model, outs["fastadv"], y),
                "robust_baseline": _robust(model, outs["baseline"], y) if "baseline" in outs else None,
                "median_l2_fastadv": None, "median_l2_baseline": None,
                "eps": getattr(case.fastadv, "kwargs", {}).get("eps"), "load": [load_before, _load()],
                "cores": _cores(),
            })
            if case.min_norm:
                sides = [outs["fastadv"]] + ([outs["baseline"]] if "baseline" in outs else [])
                meds = _median_l2_on_common(model, x, y, sides)
                rows[-1]["median_l2_fastadv"] = meds[0]
                rows[-1]["median_l2_baseline"] = meds[1] if len(meds) > 1 else None
                meds = _median_size_on_common(model, x, y, sides, case.size_norm)
                rows[-1]["size_norm"] = case.size_norm
                rows[-1]["median_size_fastadv"] = meds[0]
                rows[-1]["median_size_baseline"] = meds[1] if len(meds) > 1 else None
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):   # not on every platform
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "CPU"


def format_eps(e) -> str:
    """A budget as the field writes it: 8/255 when it is a whole number of 255ths."""
    if e is None:
        return "-"
    k = e * 255
    if e > 0 and abs(k - round(k)) < 1e-6 and round(k) < 255:
        return f"{int(round(k))}/255"
    return f"{e:g}"


def load_note(rows: List[dict]) -> Optional[str]:
    """The machine's load while the rows ran, and a warning when it exceeded the cores: a
    contended figure is not a speed figure."""
    loads = [v for r in rows for v in (r.get("load") or []) if v is not None]
    if not loads:
        return None
    cores = max((r.get("cores") or 0) for r in rows) or _cores()
    note = (f"load average (1 min) {min(loads):.1f}–{max(loads):.1f} while the rows ran, on {cores} "
            f"core{'s' if cores != 1 else ''}")
    if max(loads) > cores:
        note += (f". WARNING: the load exceeded the {cores} cores: other jobs shared the CPU, so these "
                 "times are contended, not speed figures; only the side-by-side ratios of one row "
                 "are comparable, and only roughly")
    return note


def format_table(rows: List[dict]) -> str:
    """A plain-text (markdown-compatible) table of ``attacks_table`` rows, with footnotes naming
    the models, the budget, and the machine's load while it ran."""
    if not rows:
        return "(no rows)"

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ["case", "model", "points", "ε", "fastadv s", "baseline", "baseline s", "speedup",
            "floor", "base floor", "robust fastadv", "robust base"]
    show_l2 = any(r.get("median_l2_fastadv") is not None or r.get("size_norm") for r in rows)
    # rows sized in another norm than L2 (EADL1: L1, JSMA: L0) say which, after the number
    mixed = any(r.get("size_norm", "L2") != "L2" for r in rows)
    if show_l2:
        head += ["median size fastadv", "median size base"] if mixed else ["median L2 fastadv", "median L2 base"]

    def size(r, side):
        if not mixed:
            return f(r.get(f"median_l2_{side}"), ".3f")
        v = r.get(f"median_size_{side}", r.get(f"median_l2_{side}"))
        return "-" if v is None else f"{v:.3f} {r.get('size_norm', 'L2')}"
    lines = [head]
    for r in rows:
        lines.append([r["case"], r["model"], str(r["batch"]), format_eps(r.get("eps")), f(r["fastadv_s"], ".3f"),
                      r["baseline"], f(r["baseline_s"], ".3f"),
                      "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                      f(r["floor_ratio"], ".2f"), f(r["baseline_floor_ratio"], ".2f"),
                      f(r["robust_fastadv"], ".3f"), f(r["robust_baseline"], ".3f")])
        if show_l2:
            lines[-1] += [size(r, "fastadv"), size(r, "baseline")]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    r0 = rows[0]
    thr = f", {r0['threads']} threads" if r0.get("threads") else ""
    out.append(f"\n({r0['device']}{thr}, ops backend {r0['backend']}, torch {torch.__version__}; "
               f"median of interleaved repeats; points = test digits attacked per call; ε = the budget "
               f"on inputs in [0, 1] (- : a minimum-norm attack, no budget); speedup = baseline s / "
               f"fastadv s; floor = attack s / (K x one eager fp32 forward+input-backward of the bare "
               f"model); robust = accuracy left on the same points, float32"
               + (("; median size = of the perturbations in the norm named, on the points both sides fool"
                   if mixed else "; median L2 = of the perturbations, on the points both sides fool")
                  if show_l2 else "") + ")")
    models = list(dict.fromkeys(r["model"] for r in rows))
    out.append("models: " + "; ".join(f"{m} = {MODEL_NOTES.get(m, 'a model of the caller')}" for m in models))
    note = load_note(rows)
    if note:
        out.append(note)
    return "\n".join(out)


if __name__ == "__main__":  # python -m fastadv.bench_attacks
    print(format_table(attacks_table(quick=True)))
