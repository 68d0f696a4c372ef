"""``fastadv demo``: robust training of a small CNN on the embedded MNIST-5k on a CPU in a few
minutes, then clean / PGD / AutoAttack evaluation, a table and a PNG training curve."""
from __future__ import annotations

import json
import os
import sys
import time

from .train import RECOMMENDED, method_options


def add_arguments(parser) -> None:
    parser.add_argument("--method", default=RECOMMENDED, help=f"training method (default {RECOMMENDED})")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="attack steps (default: the method's)")
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width")
    parser.add_argument("--n-train", type=int, default=None, help="default 4000 (1000 with --quick)")
    parser.add_argument("--n-test", type=int, default=None, help="default 1000 (200 with --quick)")
    parser.add_argument("--pgd-steps", type=int, default=40)
    parser.add_argument("--aa-samples", type=int, default=None,
                        help="held-out samples AutoAttack evaluates, the slow part (default 200; 20 with --quick)")
    parser.add_argument("--aa-version", default="standard", choices=["standard", "plus", "rand"])
    parser.add_argument("--no-autoattack", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the standard-training baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fastadv-demo", help="directory for the table, curve, weights")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 epoch on 1000 digits, 200 test, AutoAttack on 20 "
                             "(explicit options still win)")


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
        a1.plot(ep, [r["train_loss"] for r in hist], marker="o", label=label)
        a2.plot(ep, [r["val_clean_acc"] for r in hist], marker="o", label=f"{label}: clean")
        a2.plot(ep, [r["robust_acc"] for r in hist], marker="s", linestyle="--", label=f"{label}: PGD")
    a1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    a2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title=f"held-out accuracy (PGD at ε={eps:g})")
    a1.legend()
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(args) -> int:
    import torch

    from fastadv import data, models
    from fastadv.train import AdversarialTrainer
    from fastadv.train import checkpoint as ckpt

    defaults = (1, 1000, 200, 20) if args.quick else (10, 4000, 1000, 200)
    for name, v in zip(("epochs", "n_train", "n_test", "aa_samples"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, v)
    # every argument checked before minutes of baseline training are spent
    try:
        for name in ("epochs", "n_train", "n_test", "aa_samples"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive count, "
                                 f"got {getattr(args, name)}")
        from fastadv.train.methods import get_method
        get_method(args.method, args.eps, None, args.steps, **method_options(args.method))
    except (ValueError, TypeError) as exc:
        print(f"fastadv demo: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    try:
        (xtr, ytr), (xte, yte) = data.load_dataset("mnist5k", n_test=1000, seed=0)
    except ImportError as exc:
        print(f"fastadv demo: {exc}", file=sys.stderr)
        return 2
    xtr, ytr, xte, yte = xtr[: args.n_train], ytr[: args.n_train], xte[: args.n_test], yte[: args.n_test]
    print(f"fastadv demo: SmallCNN(width={args.width}) on {len(xtr)} MNIST digits, ε={args.eps}, "
          f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}, {torch.get_num_threads()} CPU threads", flush=True)

    runs = ([] if args.no_baseline else ["standard"]) + [args.method]
    rows, curves = [], {}
    for method in runs:
        torch.manual_seed(args.seed)
        model = models.SmallCNN(width=args.width)
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
        print(f"\n== {method} ==", flush=True)
        hist = tr.fit(loader, args.epochs, val_loader=val, guard_size=500,
                      eps_warmup=min(2.0, args.epochs / 2.5), verbose=True)
        curves[method] = list(hist)
        train_time = sum(r["time"] for r in hist)
        test = data.make_loader(xte, yte, batch_size=500, shuffle=False)
        t0 = time.perf_counter()
        ev = tr.evaluate(test, steps=args.pgd_steps)
        t_pgd = time.perf_counter() - t0
        row = {"method": method, "train_time_s": round(train_time, 1), "clean_acc": ev["clean_acc"],
               f"pgd{args.pgd_steps}_acc": ev["robust_acc"], "pgd_time_s": round(t_pgd, 1)}
        if not args.no_autoattack:
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
            name = "model.safetensors"
            try:
                ckpt.save_weights(tr.module.state_dict(), os.path.join(args.out, name),
                                  {"method": method, "eps": args.eps})
            except ImportError:
                ckpt.save_weights(tr.module.state_dict(), os.path.join(args.out, "model.pt"),
                                  {"method": method, "eps": args.eps})

    k = f"pgd{args.pgd_steps}_acc"
    lines = [f"| method | train time (s) | clean | PGD-{args.pgd_steps} | AutoAttack |", "|---|---|---|---|---|"]
    for r in rows:
        aa = r.get("autoattack_acc")
        aa_s = "skipped" if args.no_autoattack or aa is None else f"{aa:.1%} (n={r['autoattack_n']})"
        lines.append(f"| {r['method']} | {r['train_time_s']} | {r['clean_acc']:.1%} | {r[k]:.1%} | {aa_s} |")
    table = "\n".join(lines)
    print(f"\nMNIST-5k, ε={args.eps} (L∞), {len(xte)} held-out digits\n\n{table}")
    why = _curve(os.path.join(args.out, "curve.png"), curves, args.eps)
    if why:
        print(f"training curve: {why}")
    else:
        print(f"\ntraining curve: {os.path.join(args.out, 'curve.png')}")
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(f"# fastadv demo\n\nMNIST-5k, ε={args.eps} (L∞), SmallCNN(width={args.width}), "
                 f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}, {torch.get_num_threads()} CPU threads\n\n{table}\n")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"rows": rows, "history": curves}, fh, indent=1)
    return 0
