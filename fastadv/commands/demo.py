"""``fastadv demo``: robust training of a small CNN on the embedded MNIST-5k on a CPU in a few
minutes, then clean / PGD / AutoAttack evaluation, a table and a PNG training curve.

Exit status as `fastadv train`'s: 1 when the method's training collapsed with no earlier epoch
to go back to, so its robust accuracy is not measurable (the table says so, with the reason)."""
from __future__ import annotations

import os
import shlex
import statistics
import sys
import time

from ._args import add_progress, at_least, budget, check_out, check_threads, progress_on
from .train import EXIT_COLLAPSED, RECOMMENDED, final_evaluation, method_options


def add_arguments(parser) -> None:
    parser.add_argument("--method", default=RECOMMENDED, help=f"training method (default {RECOMMENDED})")
    parser.add_argument("--eps", type=budget, default=0.3, help="L∞ radius, a number or a fraction such as 8/255")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="attack steps (default: the method's)")
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width")
    parser.add_argument("--n-train", type=int, default=None, help="default 4000 (1000 with --quick)")
    parser.add_argument("--n-test", type=int, default=None, help="default 1000 (200 with --quick)")
    parser.add_argument("--pgd-steps", type=int, default=40, help="PGD steps of the held-out evaluation")
    parser.add_argument("--aa-samples", type=int, default=None,
                        help="held-out samples AutoAttack evaluates, the slow part (default 200; 20 with --quick)")
    parser.add_argument("--aa-version", default="standard", choices=["standard", "plus", "rand"],
                        help="AutoAttack version")
    parser.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack")
    parser.add_argument("--no-baseline", action="store_true", help="skip the standard-training baseline")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization, data order and attacks")
    parser.add_argument("--out", default="fastadv-demo", help="directory for the table, curve, weights")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 epoch on 1000 digits, 200 test, AutoAttack on 20 "
                             "(explicit options still win)")
    add_progress(parser)


def _autoattack(model, x, y, eps, version, seed):
    """AutoAttack's robust accuracy, or None with the reason when it is not available."""
    try:
        from fastadv.attacks import AutoAttack
    except ImportError as exc:
        return None, f"skipped (AutoAttack is not in this build: {exc})"
    aa = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, verbose=False)
    aa.run_standard_evaluation(x, y, bs=250)
    return aa.robust_accuracy, None


def _curve(path, curves, eps):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib is not installed: pip install matplotlib)"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, hist in curves.items():
        ep = [r["epoch"] for r in hist]
        a1.plot(ep, [r["train_loss"] for r in hist], marker="o",
                label=f"{label} ({'clean' if label == 'standard' else 'adversarial'} inputs)")
        a2.plot(ep, [r["val_clean_acc"] for r in hist], marker="o", label=f"{label}: clean")
        a2.plot(ep, [r["robust_acc"] for r in hist], marker="s", linestyle="--", label=f"{label}: PGD")
    a1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    a2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title=f"held-out accuracy (PGD at ε={eps:g})")
    a1.legend()
    a2.legend(fontsize=8)
    fig.tight_layout()
    from fastadv._files import atomic_savefig
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return None


def _epoch_line(method: str, r: dict) -> str:
    # standard training trains on clean inputs: its training accuracy is not "adversarial"
    acc = "train-clean" if method == "standard" else "train-adv"
    parts = [f"epoch {r['epoch']:3d}", f"loss {r['train_loss']:.4f}", f"{acc} {r['train_adv_acc']:.1%}"]
    if "val_clean_acc" in r:
        parts.append(f"val-clean {r['val_clean_acc']:.1%}")
    if "robust_acc" in r:
        rob = r["robust_acc"]
        parts.append("PGD not measurable" if rob != rob else f"PGD {rob:.1%}")
    parts.append(f"{r['time']:.1f}s")
    if r.get("cpu_time") is not None:
        parts.append(f"CPU {r['cpu_time']:.1f}s")
    if r.get("collapse"):
        parts.append("COLLAPSE")
    return " | ".join(parts)


def check_args(args) -> None:
    for name in ("epochs", "n_train", "n_test", "aa_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive count, got {getattr(args, name)}")
    at_least("--width", args.width, 1)
    at_least("--pgd-steps", args.pgd_steps, 1)
    at_least("--steps", args.steps, 1)
    check_threads("--threads", args.threads)
    from fastadv.budget import check_eps_budget
    if not (args.eps == args.eps and args.eps > 0):
        raise ValueError(f"--eps: expected a number > 0, got {args.eps}")
    check_eps_budget(args.eps, "Linf", 0.0, 1.0, name="--eps",
                     allow_name="an eps below 1 (training at an eps that covers the inputs is refused)")
    from fastadv.train.methods import get_method
    get_method(args.method, args.eps, None, args.steps, **method_options(args.method))
    check_out("--out", args.out)


def run(args) -> int:
    import torch

    from fastadv import data, runs
    from fastadv._files import atomic_write_json, atomic_write_text
    from fastadv.train import AdversarialTrainer
    from fastadv.train import checkpoint as ckpt

    defaults = (1, 1000, 200, 20) if args.quick else (10, 4000, 1000, 200)
    for name, v in zip(("epochs", "n_train", "n_test", "aa_samples"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, v)
    # every argument checked before minutes of baseline training are spent
    try:
        check_args(args)
    except (ValueError, TypeError) as exc:
        print(f"fastadv demo: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        (xtr, ytr), (xte, yte) = data.load_dataset("mnist5k", n_test=1000, seed=0)
    except ImportError as exc:
        print(f"fastadv demo: {exc}", file=sys.stderr)
        return 2
    xtr, ytr, xte, yte = xtr[: args.n_train], ytr[: args.n_train], xte[: args.n_test], yte[: args.n_test]
    print(f"fastadv demo: SmallCNN(width={args.width}) on {len(xtr)} MNIST digits, ε={args.eps:g}, "
          f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}, {torch.get_num_threads()} CPU threads", flush=True)

    runs_ = ([] if args.no_baseline else ["standard"]) + [args.method]
    rows, curves = [], {}
    spec = {"name": "small_cnn", "kwargs": {"in_channels": 1, "num_classes": 10, "width": args.width,
                                            "input_size": 28}}
    for method in runs_:
        torch.manual_seed(args.seed)
        model = runs.build_model(spec)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        try:
            tr = AdversarialTrainer(model, opt, method=method, eps=args.eps, seed=args.seed,
                                    steps=args.steps if method != "standard" else None,
                                    channels_last=True, attack_amp="bf16", **method_options(method))
        except (ValueError, TypeError) as exc:
            print(f"fastadv demo: {exc}", file=sys.stderr)
            return 2
        loader = data.make_loader(xtr, ytr, batch_size=64, indexed=(method == "atta"), seed=args.seed)
        val = data.make_loader(xte[:500], yte[:500], batch_size=500, shuffle=False)
        print(f"\n== {method} ({'clean inputs' if method == 'standard' else 'adversarial training'}) ==",
              flush=True)
        # an epoch at a time (fit continues where it stopped), each reported with its own label;
        # the best weights go back (after a collapse) only at the end, as in one fit()
        for e in range(1, args.epochs + 1):
            hist = tr.fit(loader, e, val_loader=val, guard_size=500,
                          eps_warmup=min(2.0, args.epochs / 2.5), verbose=False,
                          restore_best="on_collapse" if e == args.epochs else False,
                          progress=progress_on(args.progress))
            print(_epoch_line(method, hist[-1]), flush=True)
        curves[method] = list(hist)
        times = [r["time"] for r in hist]
        cpu = [r["cpu_time"] for r in hist if r.get("cpu_time") is not None]
        test = data.make_loader(xte, yte, batch_size=500, shuffle=False)
        t0 = time.perf_counter()
        # as `fastadv train` does: a model PGD cannot attack (its training collapsed with no
        # earlier epoch to go back to) gets NaN and the reason, not a traceback
        ev = final_evaluation(tr, hist, test, args.pgd_steps)
        t_pgd = time.perf_counter() - t0
        measured = "robust_error" not in ev
        # the median epoch: one epoch slowed by another job cannot invert the comparison
        row = {"method": method, "median_epoch_s": round(statistics.median(times), 2),
               "epoch_times_s": [round(t, 2) for t in times], "train_time_s": round(sum(times), 1),
               "cpu_time_s": round(sum(cpu), 1) if cpu else None,
               "median_epoch_cpu_s": round(statistics.median(cpu), 2) if cpu else None,
               "clean_acc": ev["clean_acc"], f"pgd{args.pgd_steps}_acc": ev["robust_acc"],
               "pgd_time_s": round(t_pgd, 1)}
        if not measured:
            row["robust_error"] = ev["robust_error"]
            collapsed = (f"catastrophic overfitting at epoch(s) {hist.collapsed_epochs} and no earlier "
                         f"epoch to go back to: " if hist.collapsed else "")
            print(f"{method}: {collapsed}the final model's robust accuracy cannot be measured "
                  f"({ev['robust_error']})", flush=True)
            if not args.no_autoattack:
                row["autoattack_acc"] = None
                row["autoattack_note"] = "skipped (the model cannot be attacked: see robust_error)"
        elif not args.no_autoattack:
            n = min(args.aa_samples, len(xte))
            t0 = time.perf_counter()
            aa, why = _autoattack(tr.module.eval(), xte[:n], yte[:n], args.eps, args.aa_version, args.seed)
            row["autoattack_acc"] = aa
            row["autoattack_n"] = n
            row["autoattack_time_s"] = round(time.perf_counter() - t0, 1)
            if why:
                row["autoattack_note"] = why
                print(f"AutoAttack: {why}")
        rows.append(row)
        if method == args.method:
            desc = runs.run_description("small_cnn", spec["kwargs"], data="mnist5k", eps=args.eps,
                                        n_test=1000, method=method)
            meta = runs.weights_metadata(desc, method=method, eps=args.eps)
            runs.write_run_file(args.out, desc)
            try:
                ckpt.save_weights(tr.module.state_dict(), os.path.join(args.out, "model.safetensors"), meta)
            except ImportError:
                ckpt.save_weights(tr.module.state_dict(), os.path.join(args.out, "model.pt"), meta)

    base = next((r for r in rows if r["method"] == "standard"), None)
    for r in rows:
        r["epoch_time_ratio"] = (r["median_epoch_s"] / base["median_epoch_s"]) if base and base["median_epoch_s"] else None
        if base and r.get("median_epoch_cpu_s") and base.get("median_epoch_cpu_s"):
            r["epoch_cpu_ratio"] = r["median_epoch_cpu_s"] / base["median_epoch_cpu_s"]
    k = f"pgd{args.pgd_steps}_acc"
    lines = [f"| method | median epoch (s) | × standard (wall) | × standard (CPU) | clean | PGD-{args.pgd_steps} "
             f"| AutoAttack |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        aa = r.get("autoattack_acc")
        aa_s = "skipped" if args.no_autoattack or aa is None else f"{aa:.1%} (n={r['autoattack_n']})"
        ratio = "-" if r.get("epoch_time_ratio") is None else f"{r['epoch_time_ratio']:.2f}"
        cratio = "-" if r.get("epoch_cpu_ratio") is None else f"{r['epoch_cpu_ratio']:.2f}"
        pgd = "not measurable" if "robust_error" in r else f"{r[k]:.1%}"
        lines.append(f"| {r['method']} | {r['median_epoch_s']:.2f} | {ratio} | {cratio} | {r['clean_acc']:.1%} | "
                     f"{pgd} | {aa_s} |")
    table = "\n".join(lines)
    note = ("Training time: the median epoch's wall time (and its ratio to standard training's, wall and "
            "process CPU time), so one epoch slowed by another job on the machine cannot invert the "
            "comparison. Standard training trains on clean inputs.")
    print(f"\nMNIST-5k, ε={args.eps:g} (L∞), {len(xte)} held-out digits\n\n{table}\n\n{note}")
    why = _curve(os.path.join(args.out, "curve.png"), curves, args.eps)
    if why:
        print(f"training curve: {why}")
    else:
        print(f"\ntraining curve: {os.path.join(args.out, 'curve.png')}")
    atomic_write_text(f"# fastadv demo\n\nMNIST-5k, ε={args.eps:g} (L∞), SmallCNN(width={args.width}), "
                      f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}, {torch.get_num_threads()} CPU "
                      f"threads\n\n{table}\n\n{note}\n", os.path.join(args.out, "results.md"))
    atomic_write_json({"rows": rows, "history": curves}, os.path.join(args.out, "results.json"))
    if any("robust_error" in r for r in rows if r["method"] == args.method):
        print("no point evaluating it under attack: run again with another --method, more --epochs "
              "or a smaller --eps")
        return EXIT_COLLAPSED
    print(f"evaluate the trained model fully: fastadv eval {shlex.quote(args.out)}")
    return 0
