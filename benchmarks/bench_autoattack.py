"""fastadv AutoAttack against the reference AutoAttack on the same model and points, in one run.

The reference is the AutoAttack port in torchattacks (``torchattacks.AutoAttack``;
its APGD/APGD-T/FAB/Square follow fra31/auto-attack line by line). Note that
``torchattacks.AutoAttack`` leaves the attacks at torchattacks' defaults of 10
iterations; the published "standard" AutoAttack runs 100. So the reference here
is, by default, torchattacks' parts with the published settings (``--ref
reference``): APGD-CE (100 steps), APGD-T (100 steps, 9 targets), FAB-T (100
steps, 9 targets), Square (5000 queries), each on the points the previous ones
left robust (torchattacks.MultiAttack's loop, timed per attack). ``--ref
torchattacks`` runs the same parts at the 10 steps ``torchattacks.AutoAttack`` uses.

Model: the standard SmallCNN(width=16) the tests train on 4,000 embedded MNIST
digits (not adversarially trained), L∞ eps = 0.1 (at 0.3 it has no robust points
left and the comparison would time nothing but APGD-CE's first steps).

On a shared machine run it with ``OMP_WAIT_POLICY=PASSIVE`` (two-thread OpenMP spin-waits
are pathological under load) and quote the CPU-time ratio as well as the wall-clock one.

    python benchmarks/bench_autoattack.py                 # 100 points, 2 threads
    python benchmarks/bench_autoattack.py --n 200         # the issue's setting
    python benchmarks/bench_autoattack.py --json out.json
    python benchmarks/bench_autoattack.py --device cuda --n 1000   # the GPU target (>= 5x)

Not a timed test: speed targets live here, not in tests/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device="cpu"):
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t, time.process_time() - c


def _robust(model, x, y, xa, eps):
    with torch.no_grad():
        pred = model(xa).argmax(1)
    within = (xa - x).flatten(1).abs().amax(1) <= eps + 1e-5
    # a point is robust unless fooled within the eps ball
    return (pred == y) | ~within


def pass_costs(model, x, y, reps: int = 10):
    """Seconds per row of one forward+input-backward and of one forward of the bare model
    (eager fp32, the batch as the user has it: contiguous NCHW)."""
    xx = x.contiguous().clone()
    with torch.no_grad():
        model(xx)
    _sync(x.device)
    t = time.perf_counter()
    for _ in range(reps):
        xr = xx.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xr), y)
        torch.autograd.grad(loss, xr)
    _sync(x.device)
    fb = (time.perf_counter() - t) / reps / len(x)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(reps):
            model(xx)
    _sync(x.device)
    f = (time.perf_counter() - t) / reps / len(x)
    return fb, f


def reference_attacks(model, eps, kind: str):
    """[(name, attack)] run in sequence, each on the points the previous ones left robust
    (what torchattacks.MultiAttack does), so each attack can be timed."""
    import torchattacks
    steps = 10 if kind == "torchattacks" else 100  # torchattacks.AutoAttack keeps its 10-step defaults
    return [
        ("apgd-ce", torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0)),
        ("apgd-t", torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=10,
                                      seed=0)),
        ("fab-t", torchattacks.FAB(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                                   n_classes=10, seed=0)),
        ("square", torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0)),
    ]


def run_reference(model, x, y, attacks):
    """torchattacks.MultiAttack's loop, with a clock per attack."""
    final = x.clone()
    fails = torch.arange(len(x), device=x.device)
    times = {}
    for name, atk in attacks:
        t = time.perf_counter()
        if len(fails):
            adv = atk(x[fails], y[fails])
            with torch.no_grad():
                correct = model(adv).argmax(1) == y[fails]
            final[fails[~correct]] = adv[~correct]
            fails = fails[correct]
        _sync(x.device)
        times[name] = time.perf_counter() - t
    return final, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="points (the issue quotes 200)")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where both sides run (the model is trained on the CPU, then moved)")
    ap.add_argument("--ref", choices=["reference", "torchattacks", "both", "none"], default="reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import zoo
    from fastadv.attacks import AutoAttack

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU visible")
    model = zoo.mnist_cnn().to(dev)
    _, (xt, yt) = zoo.mnist_split()
    x, y = xt[: args.n].contiguous().to(dev), yt[: args.n].contiguous().to(dev)
    fb, f = pass_costs(model, x, y)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads")
    out = {"date": datetime.date.today().isoformat(), "device": where,
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "n": args.n, "eps": args.eps, "model": "SmallCNN(width=16), standard training, MNIST-5k",
           "sec_per_row_fwd_bwd": fb, "sec_per_row_fwd": f}

    # warm-up, both sides: one-time costs (loading the compiled ops, oneDNN primitives) are
    # not what is compared
    AutoAttack(model, eps=args.eps, steps=2, n_queries=2, seed=0, verbose=False).run_standard_evaluation(
        x[:4], y[:4])
    import torchattacks
    torchattacks.APGD(model, eps=args.eps, steps=2)(x[:4], y[:4])

    aa = AutoAttack(model, norm="Linf", eps=args.eps, version="standard", seed=args.seed, verbose=False)
    xa, wall, cpu = _timed(lambda: aa.run_standard_evaluation(x, y, bs=args.n), dev)
    r = aa.last_result
    work = r.extra["work"]
    grad_rows = sum(v for k, v in work.items() if k != "square")
    fab_rows = sum(v for k, v in work.items() if k.startswith("fab"))
    floor = grad_rows * fb + fab_rows * f + work.get("square", 0) * f
    rob = _robust(model, x, y, xa, args.eps)
    out["fastadv"] = {"robust_accuracy": rob.float().mean().item(), "clean_accuracy": aa.clean_accuracy,
                      "wall_s": wall, "cpu_s": cpu, "per_attack_s": r.extra["time"], "work_rows": work,
                      "floor_s": floor, "floor_ratio": wall / floor if floor else None}
    print(f"fastadv   robust {out['fastadv']['robust_accuracy']:.2%}  wall {wall:7.1f} s  cpu {cpu:7.1f} s  "
          f"floor ratio {out['fastadv']['floor_ratio']:.2f}  per attack "
          + ", ".join(f"{k} {v:.1f}s" for k, v in r.extra["time"].items()), flush=True)

    kinds = {"reference": ["reference"], "torchattacks": ["torchattacks"],
             "both": ["reference", "torchattacks"], "none": []}[args.ref]
    for kind in kinds:
        ref = reference_attacks(model, args.eps, kind)
        (xr, times_r), wall_r, cpu_r = _timed(lambda: run_reference(model, x, y, ref), dev)
        rob_r = _robust(model, x, y, xr, args.eps)
        out[kind] = {"robust_accuracy": rob_r.float().mean().item(), "wall_s": wall_r, "cpu_s": cpu_r,
                     "per_attack_s": times_r,
                     "speedup_wall": wall_r / wall, "speedup_cpu": cpu_r / cpu,
                     "points_fastadv_robust_ref_not": int((rob & ~rob_r).sum()),
                     "points_ref_robust_fastadv_not": int((~rob & rob_r).sum())}
        print(f"{kind:9s} robust {out[kind]['robust_accuracy']:.2%}  wall {wall_r:7.1f} s  cpu {cpu_r:7.1f} s  "
              f"speedup {wall_r / wall:.2f}x wall, {cpu_r / cpu:.2f}x cpu  "
              f"(robust here but fooled by the reference: {out[kind]['points_fastadv_robust_ref_not']}, "
              f"the other way: {out[kind]['points_ref_robust_fastadv_not']})  per attack "
              + ", ".join(f"{k} {v:.1f}s" for k, v in times_r.items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
