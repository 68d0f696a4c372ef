"""The Python stages of benchmarks/gpu_session.sh: PGD and AutoAttack against torchattacks, and
the session summary (ops bandwidth and ratios read off the pytest-benchmark JSON files).

    python benchmarks/gpu_session.py pgd        --out DIR [--dry-run]
    python benchmarks/gpu_session.py autoattack --out DIR [--dry-run] [--n 300]
    python benchmarks/gpu_session.py summary    --out DIR [--dry-run] --stages STAGES_FILE

Each writes its figures as JSON under ``--out`` (pgd.json, autoattack.json, summary.json),
stamped with the device and the date. ``--dry-run``: tiny sizes on the CPU (an untrained
small CNN, a handful of points, two steps), so that every stage's code runs end to end in CI
without a GPU; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402


def _stamp(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def _device(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (use --dry-run for the CPU walk-through)")
    return torch.device("cuda")


def _write(out: str, name: str, obj) -> None:
    path = os.path.join(out, name)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)
    print(f"wrote {path}")


# ----------------------------------------------------------------------- PGD
PGD_ROWS = ("PGD-10 Linf fp32", "PGD-10 Linf bf16", "PGD-10 Linf bf16 + cuda_graph",
            "PGD-10 Linf fp16 + cuda_graph")


def pgd_cases(dry: bool):
    """PGD-10 L∞ vs torchattacks.PGD: PreAct ResNet-18, batch 512, in fp32, bf16, bf16 + CUDA
    graph, and fp16 + CUDA graph (the dynamic loss scale on the device). Dry: an untrained
    SmallCNN(width=4), 8 MNIST points, 2 steps; cuda_graph falls back to eager there."""
    from fastadv import bench_attacks as ba
    if not dry:
        return [c for c in ba.default_cases("cuda") if c.name in PGD_ROWS], 3
    from fastadv import models
    # an untrained model in bench_attacks' zoo, saved in its cache first so that bench_model
    # loads it (its training set-up alone, Adam's import, costs seconds)
    ba._MODELS.setdefault("dry_cnn", (lambda: models.SmallCNN(width=4), "mnist", 0))
    path = os.path.join(ba.CACHE, f"dry_cnn-torch{torch.__version__}.pt")
    if not os.path.exists(path):
        os.makedirs(ba.CACHE, exist_ok=True)
        torch.save(models.SmallCNN(width=4).state_dict(), path)
    linf = dict(eps=8 / 255, alpha=2 / 255, steps=2)
    cases = []
    for name, kw in (("PGD-10 Linf fp32", {}), ("PGD-10 Linf bf16", dict(amp="bf16")),
                     ("PGD-10 Linf bf16 + cuda_graph", dict(amp="bf16", cuda_graph=True)),
                     ("PGD-10 Linf fp16 + cuda_graph", dict(amp="fp16", cuda_graph=True))):
        cases.append(ba.Case(name, "dry_cnn", 8, 2, ba._fa("PGD", **kw, **linf), "torchattacks.PGD",
                             ba._ta("PGD", **linf), "any"))
    return cases, 1


def stage_pgd(args) -> int:
    import warnings
    from fastadv import bench_attacks as ba
    dev = _device(args.dry_run)
    cases, repeats = pgd_cases(args.dry_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cuda_graph on the CPU: "ignored, running eagerly"
        rows = ba.attacks_table(device=dev.type, threads=None, cases=cases, repeats=repeats)
    print(ba.format_table(rows))
    _write(args.out, "pgd.json", dict(_stamp(dev), dry_run=args.dry_run, rows=rows))
    return 0 if len(rows) == len(cases) else 1


# ----------------------------------------------------------------- AutoAttack
def stage_autoattack(args) -> int:
    """fastadv's AutoAttack (standard) against torchattacks' ports of its parts at the
    published settings (bench_autoattack's reference), on the MNIST CNN and ``--n`` points."""
    import bench_autoattack as bench
    import torchattacks
    from fastadv import AutoAttack

    dev = _device(args.dry_run)
    eps = 0.1
    if args.dry_run:
        from fastadv import models
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = models.SmallCNN(width=4).eval()
        gen = torch.Generator().manual_seed(0)
        x, y = torch.rand(args.n, 1, 28, 28, generator=gen), torch.randint(0, 10, (args.n,), generator=gen)
        steps, queries = 2, 5
        ref = [("apgd-ce", torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, loss="ce", seed=0)),
               ("apgd-t", torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_classes=10, seed=0)),
               ("fab-t", torchattacks.FAB(model, norm="Linf", eps=eps, steps=steps, multi_targeted=True,
                                          n_classes=10, seed=0)),
               ("square", torchattacks.Square(model, norm="Linf", eps=eps, n_queries=queries, seed=0))]
    else:
        import zoo
        model = zoo.mnist_cnn().to(dev)
        _, (xt, yt) = zoo.mnist_split()
        x, y = xt[:args.n].contiguous().to(dev), yt[:args.n].contiguous().to(dev)
        steps, queries = 100, 5000
        ref = bench.reference_attacks(model, eps, "reference")
    # warm-up, both sides (one-time costs are not what is compared)
    AutoAttack(model, eps=eps, steps=2, n_queries=2, seed=0).run_standard_evaluation(x[:4], y[:4])
    torchattacks.APGD(model, eps=eps, steps=2)(x[:4], y[:4])
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", steps=steps, n_queries=queries, seed=0)
    xa, wall, cpu = bench._timed(lambda: aa.run_standard_evaluation(x, y, bs=args.n), dev)
    rob = bench._robust(model, x, y, xa, eps)
    (xr, per_ref), wall_r, cpu_r = bench._timed(lambda: bench.run_reference(model, x, y, ref), dev)
    rob_r = bench._robust(model, x, y, xr, eps)
    out = dict(_stamp(dev), dry_run=args.dry_run, n=args.n, eps=eps, steps=steps, n_queries=queries,
               model="SmallCNN(width=16), standard training, MNIST-5k" if not args.dry_run
               else "SmallCNN(width=4), untrained (dry run)",
               fastadv={"robust_accuracy": rob.float().mean().item(), "clean_accuracy": aa.clean_accuracy,
                        "wall_s": wall, "cpu_s": cpu, "per_attack_s": aa.last_result.extra["time"]},
               reference={"name": "torchattacks' APGD-CE, APGD-T, FAB-T, Square in sequence",
                          "robust_accuracy": rob_r.float().mean().item(), "wall_s": wall_r, "cpu_s": cpu_r,
                          "per_attack_s": per_ref},
               speedup_wall=wall_r / wall if wall else None,
               points_fastadv_robust_ref_not=int((rob & ~rob_r).sum()),
               points_ref_robust_fastadv_not=int((~rob & rob_r).sum()))
    print(f"AutoAttack standard, {args.n} points: fastadv robust {out['fastadv']['robust_accuracy']:.2%} "
          f"in {wall:.1f} s, reference robust {out['reference']['robust_accuracy']:.2%} in {wall_r:.1f} s: "
          f"{out['speedup_wall']:.2f}x")
    _write(args.out, "autoattack.json", out)
    return 0


# -------------------------------------------------------------------- summary
def _copy_gbps(nbytes: int, dev: torch.device) -> float:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` (half read, half written)."""
    from fastadv import bench_ops
    src = torch.rand(max(1, nbytes // 8), device=dev)
    dst = torch.empty_like(src)
    med, _ = bench_ops.measure({"copy": lambda: dst.copy_(src)}, dev.type, repeats=3, target_s=0.01)["copy"]
    return nbytes / med / 1e9


def _benchmarks(path: str, module: str):
    """The rows of one benchmark file in a pytest-benchmark JSON (None: no such JSON)."""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        data = json.load(fh)
    return [b for b in data.get("benchmarks", []) if module in b.get("fullname", "")]


def ops_rows(path: str, dev: torch.device):
    """Per bench_ops row: median, the bytes a fused op must move, GB/s, its fraction of copy
    bandwidth for the same bytes, and the ratio eager median / its median."""
    bench = _benchmarks(path, "bench_ops")
    if bench is None:
        return None
    rows, eager, copy = [], {}, {}
    for b in bench:
        p = b.get("params", {})
        med = b["stats"]["median"]
        if p.get("backend") == "eager":
            eager[b["group"]] = med
        row = {"group": b["group"], "op": p.get("op"), "backend": p.get("backend"), "size": p.get("size"),
               "median_s": med}
        extra = b.get("extra_info") or {}
        for k in ("l2_schedule", "est_dram_bytes", "min_dram_bytes", "min_over_est"):
            if k in extra:  # the triton L2 schedule's DRAM estimate (bench_ops.l2_traffic)
                row[k] = extra[k]
        rows.append(row)
    for r in rows:
        numel = 1
        for d in (r["size"] or []):
            numel *= int(d)
        tensors = 4 if str(r["op"]).endswith("step") else 3  # read x_adv, x_nat(, grad); write out
        r["bytes"] = tensors * numel * 4
        if r["bytes"] not in copy:
            copy[r["bytes"]] = _copy_gbps(r["bytes"], dev)
        r["gb_per_s"] = r["bytes"] / r["median_s"] / 1e9
        r["copy_fraction"] = r["gb_per_s"] / copy[r["bytes"]]
        r["vs_eager"] = eager[r["group"]] / r["median_s"] if r["group"] in eager else None
    return rows


def triton_rows(path: str):
    """bench_triton's rows: it records copy_fraction and speedup_vs_eager itself."""
    bench = _benchmarks(path, "bench_triton")
    if bench is None:
        return None
    return [dict(b.get("extra_info", {}), group=b["group"], median_s=b["stats"]["median"]) for b in bench]


def stage_summary(args) -> int:
    dev = _device(args.dry_run)
    stages = []
    if args.stages and os.path.exists(args.stages):
        with open(args.stages) as fh:
            for line in fh:
                name, rc, secs, note = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
                stages.append({"stage": name, "rc": None if rc == "" else int(rc),
                               "seconds": None if secs == "" else int(secs), "note": note})
    out = dict(_stamp(dev), dry_run=args.dry_run, stages=stages,
               ops=ops_rows(os.path.join(args.out, "ops.json"), dev),
               triton=triton_rows(os.path.join(args.out, "ops.json")))
    for name in ("pgd", "autoattack"):
        path = os.path.join(args.out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as fh:
                out[name] = json.load(fh)
    _write(args.out, "summary.json", out)
    print("\nstage        rc  seconds  note")
    for s in stages:
        print(f"{s['stage']:12s} {str(s['rc']):>3s} {str(s['seconds']):>8s}  {s['note']}")
    for r in (out["ops"] or []):
        if r["backend"] != "eager":
            ve = "-" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}x"
            est = (f"  est. DRAM {r['min_over_est']:.0%} of min-traffic efficient ({r['l2_schedule']})"
                   if "min_over_est" in r else "")
            print(f"ops  {r['group']:28s} {r['backend']:7s} {r['gb_per_s']:8.1f} GB/s "
                  f"{r['copy_fraction']:6.0%} of copy  {ve} eager{est}")
    for r in (out["triton"] or []):
        if r.get("impl") in ("triton", "prev"):  # prev: the L2 schedule before waves (A/B)
            est = (f", est. DRAM min/est {r['min_over_est']:.0%} ({r['schedule']})"
                   if "min_over_est" in r else "")
            print(f"{r.get('impl')} {r.get('op')} {r.get('shape')}: {r.get('gb_per_s', 0):.0f} GB/s, "
                  f"{r.get('copy_fraction', 0):.0%} of copy, {r.get('speedup_vs_eager', 0):.2f}x eager{est}")
    for r in (out.get("pgd") or {}).get("rows", []):
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"pgd  {r['case']:32s} {sp} torchattacks, floor {r['floor_ratio']:.2f}, "
              f"robust {r['robust_fastadv']:.3f} vs {r['robust_baseline']}")
    aa = out.get("autoattack")
    if aa:
        print(f"autoattack {aa['n']} points: {aa['speedup_wall']:.2f}x the reference, robust "
              f"{aa['fastadv']['robust_accuracy']:.3f} vs {aa['reference']['robust_accuracy']:.3f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["pgd", "autoattack", "summary"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="AutoAttack points (300; dry run 6)")
    ap.add_argument("--stages", default=None, help="summary: the stage table the shell script kept")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 6 if args.dry_run else 300
    os.makedirs(args.out, exist_ok=True)
    t = time.perf_counter()
    rc = {"pgd": stage_pgd, "autoattack": stage_autoattack, "summary": stage_summary}[args.stage](args)
    print(f"{args.stage}: {time.perf_counter() - t:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
