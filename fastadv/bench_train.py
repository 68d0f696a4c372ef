"""Time-to-robustness of the training methods on the embedded MNIST-5k (``fastadv bench train``).

Every method trains the same small CNN with the same optimizer, epochs, batches and
seed; the table gives its training wall time ÷ standard training's, and the clean
and PGD-40 accuracy on held-out digits. The issue's target: one method within 2
points of PGD-10 AT's PGD-40 accuracy in ≤ 2× standard training's wall time.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# (label, method, options): the table's rows, in order
SPECS: List[Tuple[str, str, Dict[str, object]]] = [
    ("standard", "standard", {}),
    ("pgd-10", "pgd", {"steps": 10}),
    ("fgsm_rs", "fgsm_rs", {}),
    ("n_fgsm", "n_fgsm", {}),
    ("gradalign", "gradalign", {}),
    ("free (m=4)", "free", {}),
    ("yopo-5-3", "yopo", {}),
    # f₀ = conv + ReLU, as the authors' own MNIST network (their layer_one): a nonlinear f₀
    ("yopo-5-3+relu", "yopo", {"first_layer": ["features.0", "features.1", "features.2"]}),
    ("atta-1", "atta", {}),
    ("atta-1+free", "atta", {"free_step": True}),
    ("atta-2", "atta", {"steps": 2}),
    ("trades", "trades", {}),
    ("mart", "mart", {}),
]
QUICK = ("standard", "pgd-10", "fgsm_rs", "atta-1", "atta-1+free", "atta-2")


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per method")
    parser.add_argument("--eps", type=float, default=0.3, help="L∞ radius of training and evaluation")
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--n-train", type=int, default=4000, help="training digits")
    parser.add_argument("--n-test", type=int, default=1000, help="held-out digits")
    parser.add_argument("--eval-steps", type=int, default=40, help="PGD steps of the final evaluation")
    parser.add_argument("--eps-warmup", type=float, default=2.0, help="epochs of linear eps ramp-up")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--attack-amp", default="bf16", choices=["fp32", "bf16", "same"],
                        help="precision of the training attacks (training itself is fp32)")
    parser.add_argument("--no-channels-last", action="store_true", help="keep the contiguous layout")
    parser.add_argument("--pgd-fp32", action="store_true",
                        help="run the PGD-10 reference with an fp32 attack")
    parser.add_argument("--only", nargs="+", metavar="LABEL",
                        help="rows to run (labels of SPECS; default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of every row")
    parser.add_argument("--interleave", action="store_true",
                        help="train the rows round-robin, an epoch at a time (fair timing on a shared machine)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (default: none)")


def check_args(args) -> None:
    """Every flag checked before minutes of training (a ValueError naming the flag)."""
    for flag, v in (("--epochs", args.epochs), ("--width", args.width), ("--batch-size", args.batch_size),
                    ("--n-train", args.n_train), ("--n-test", args.n_test), ("--eval-steps", args.eval_steps),
                    ("--threads", args.threads)):
        if v is not None and v < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, got {v}")
    if not (math.isfinite(args.eps) and 0 < args.eps < 1):
        raise ValueError(f"--eps: expected a number in (0, 1) (inputs are in [0, 1]), got {args.eps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: expected a number > 0, got {args.lr}")
    if not (math.isfinite(args.eps_warmup) and args.eps_warmup >= 0):
        raise ValueError(f"--eps-warmup: expected a number >= 0, got {args.eps_warmup}")
    if args.json:
        from ._files import check_output_file
        check_output_file("--json", args.json)


def _median(v: Sequence[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def train_table(specs: Sequence[Tuple[str, str, Dict[str, object]]] = SPECS, *, epochs: int = 5,
                eps: float = 0.3, width: int = 16, batch_size: int = 64, lr: float = 1e-3,
                n_train: int = 4000, n_test: int = 1000, eval_steps: int = 40,
                eps_warmup: float = 2.0, threads: Optional[int] = 2, attack_amp: str = "bf16",
                channels_last: bool = True, pgd_fp32: bool = False, seed: int = 0,
                interleave: bool = False, log=None) -> List[Dict[str, object]]:
    """Train each spec and evaluate it; return one row (dict) per spec.

    ``interleave``: train the specs round-robin, one epoch of each in turn (``fit``
    continues where it stopped), so that a change in the machine's load hits every row
    alike; the time ratio is then the median over epochs of (this row's epoch ÷ standard
    training's same epoch). The trained models are the same as without it."""
    from . import data, models
    from .train import AdversarialTrainer

    log = log or (lambda msg: print(msg, flush=True))
    if threads:
        torch.set_num_threads(threads)
    (xtr, ytr), (xte, yte) = data.load_dataset("mnist5k", n_test=1000, seed=0)
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    val = data.make_loader(xte[:500], yte[:500], batch_size=500, shuffle=False)
    test = data.make_loader(xte, yte, batch_size=500, shuffle=False)
    fit_kw = dict(val_loader=val, guard_size=500, eps_warmup=eps_warmup, verbose=False)

    def setup(label, method, opts):
        torch.manual_seed(seed)
        model = models.SmallCNN(width=width)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        a_amp = "fp32" if (pgd_fp32 and label.startswith("pgd")) else attack_amp
        tr = AdversarialTrainer(model, opt, method=method, eps=eps, seed=seed,
                                channels_last=channels_last, attack_amp=a_amp, **opts)
        loader = data.make_loader(xtr, ytr, batch_size=batch_size, indexed=(method == "atta"), seed=seed)
        return {"label": label, "method": method, "opts": opts, "a_amp": a_amp, "tr": tr,
                "loader": loader, "wall": 0.0}

    def finish(run):
        tr, hist = run["tr"], run["tr"].history
        ev = tr.evaluate(test, eps=eps, steps=eval_steps, seed=seed)
        times = [r["time"] for r in hist]
        cpu = [r.get("cpu_time", float("nan")) for r in hist]
        row = {"label": run["label"], "method": run["method"], "alpha": tr.alpha, "steps": tr.steps,
               "options": dict(run["opts"]), "attack_amp": run["a_amp"], "epochs": epochs,
               "seed": seed, "threads": threads, "interleave": interleave,
               "train_time_s": sum(times), "epoch_times_s": times,
               # the median epoch: robust to other jobs stealing the CPU for a while
               "epoch_time_s": _median(times), "wall_s": run["wall"],
               "cpu_time_s": sum(cpu), "epoch_cpu_s": cpu,
               "clean_acc": ev["clean_acc"], f"pgd{eval_steps}_acc": ev["robust_acc"],
               "robust_acc": ev["robust_acc"], "guard_curve": [r.get("robust_acc") for r in hist],
               "collapsed": hist.collapsed}
        log(f"{row['label']:12s} time {row['train_time_s']:7.1f}s  clean {ev['clean_acc']:.1%}  "
            f"PGD-{eval_steps} {ev['robust_acc']:.1%}  guard {['%.2f' % v for v in row['guard_curve']]}")
        return row

    runs = [setup(*spec) for spec in specs] if interleave else None
    rows = []
    if interleave:
        for e in range(1, epochs + 1):
            for run in runs:
                t0 = time.perf_counter()
                # the best weights go back (after a collapse) only at the end, as in one fit()
                run["tr"].fit(run["loader"], e, restore_best="on_collapse" if e == epochs else False,
                              **fit_kw)
                run["wall"] += time.perf_counter() - t0
        rows = [finish(run) for run in runs]
    else:
        for spec in specs:
            run = setup(*spec)
            t0 = time.perf_counter()
            run["tr"].fit(run["loader"], epochs, **fit_kw)
            run["wall"] = time.perf_counter() - t0
            rows.append(finish(run))
    base = next((r for r in rows if r["method"] == "standard"), None)
    ref = next((r for r in rows if r["label"].startswith("pgd")), None)
    for r in rows:
        if base is None:
            r["time_ratio"] = r["total_time_ratio"] = r["cpu_ratio"] = float("nan")
        else:
            r["total_time_ratio"] = r["train_time_s"] / base["train_time_s"]
            if interleave:   # epoch by epoch against standard's epoch run beside it
                r["time_ratio"] = _median([a / b for a, b in zip(r["epoch_times_s"], base["epoch_times_s"])])
                r["cpu_ratio"] = _median([a / b for a, b in zip(r["epoch_cpu_s"], base["epoch_cpu_s"])])
            else:
                r["time_ratio"] = r["epoch_time_s"] / base["epoch_time_s"]
                r["cpu_ratio"] = _median(r["epoch_cpu_s"]) / _median(base["epoch_cpu_s"])
        r["gap_to_pgd_points"] = 100 * (ref["robust_acc"] - r["robust_acc"]) if ref else float("nan")
        r["meets_target"] = bool(ref is not None and base is not None and r is not ref and
                                 r["method"] != "standard" and r["gap_to_pgd_points"] <= 2.0
                                 and r["time_ratio"] <= 2.0)
    return rows


def format_table(rows: List[Dict[str, object]], eval_steps: int = 40) -> str:
    head = (f"| method | α | steps | median epoch (s) | × standard | total × standard | CPU × standard | "
            f"clean | PGD-{eval_steps} | gap to PGD-10 AT (pts) | target met |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        gap = r["gap_to_pgd_points"]
        lines.append(f"| {r['label']} | {r['alpha']:.3g} | {r['steps']} | {r['epoch_time_s']:.2f} | "
                     f"{r['time_ratio']:.2f} | {r['total_time_ratio']:.2f} | {r.get('cpu_ratio', float('nan')):.2f} | "
                     f"{r['clean_acc']:.1%} | "
                     f"{r['robust_acc']:.1%} | "
                     f"{'' if math.isnan(gap) else f'{gap:+.1f}'} | {'yes' if r['meets_target'] else ''} |")
    return "\n".join(lines)


def cost_table(methods: Sequence[str] = ("standard", "pgd", "fgsm_rs", "n_fgsm", "gradalign", "free",
                                         "yopo", "atta", "trades", "mart"),
               *, model_fn=None, shape=(1, 28, 28), batch_size: int = 64, batches: int = 20,
               repeats: int = 3, eps: float = 0.3, device: str = "cpu", threads: Optional[int] = None,
               amp=None, attack_amp: str = "same", channels_last="auto") -> List[Dict[str, object]]:
    """Per-batch cost of each method ÷ standard training's, timed interleaved (min of repeats)
    on random data: what each method's epoch costs relative to a standard epoch."""
    from . import models
    from .train import AdversarialTrainer

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model_fn = model_fn or (lambda: models.SmallCNN(width=16))
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(batches, batch_size, *shape, generator=g)
    ys = torch.randint(0, 10, (batches, batch_size), generator=g)
    trainers = {}
    for m in methods:
        torch.manual_seed(0)
        net = model_fn().to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        kw = {"dataset_size": batches * batch_size} if m == "atta" else {}
        trainers[m] = AdversarialTrainer(net, opt, method=m, eps=eps, seed=0, amp=amp,
                                         attack_amp=attack_amp, channels_last=channels_last, **kw)
    batches_dev = [(xs[i].to(dev), ys[i].to(dev), torch.arange(i * batch_size, (i + 1) * batch_size))
                   for i in range(batches)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for m, tr in trainers.items():   # warm-up (first-call costs, cudnn autotune)
        for x, y, i in batches_dev[:2]:
            tr.step(x, y, i)
    best = {m: math.inf for m in methods}
    for _ in range(repeats):
        for m, tr in trainers.items():
            sync()
            t = time.perf_counter()
            for x, y, i in batches_dev:
                tr.step(x, y, i)
            sync()
            best[m] = min(best[m], (time.perf_counter() - t) / batches)
    base = best.get("standard", math.nan)
    return [{"method": m, "ms_per_batch": 1000 * best[m], "ratio": best[m] / base,
             "alpha": trainers[m].alpha, "steps": trainers[m].steps} for m in methods]


def format_cost_table(rows) -> str:
    lines = ["| method | ms / batch | × standard |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ms_per_batch']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    try:
        check_args(args)
    except ValueError as exc:
        print(f"fastadv bench train: {exc}", file=sys.stderr)
        return 2
    specs = SPECS
    if args.quick:
        specs = [s for s in SPECS if s[0] in QUICK]
    if args.only:
        specs = [s for s in SPECS if s[0] in args.only]
        if not specs:
            print(f"fastadv bench train: --only: no rows named {args.only}; rows: {[s[0] for s in SPECS]}")
            return 2
    rows = train_table(specs, epochs=args.epochs, eps=args.eps, width=args.width,
                       batch_size=args.batch_size, lr=args.lr, n_train=args.n_train, n_test=args.n_test,
                       eval_steps=args.eval_steps, eps_warmup=args.eps_warmup, threads=args.threads,
                       attack_amp=args.attack_amp, channels_last=not args.no_channels_last,
                       pgd_fp32=args.pgd_fp32, seed=args.seed, interleave=args.interleave)
    print()
    print(format_table(rows, args.eval_steps))
    if args.json:
        from ._files import atomic_write_json
        atomic_write_json(rows, args.json, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
