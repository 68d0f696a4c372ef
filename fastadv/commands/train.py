"""``fastadv train``: adversarially train a zoo model on an embedded data set (DDP under torchrun)."""
from __future__ import annotations

import os
import shlex
import sys

from ._args import (add_progress, at_least, budget, check_device, check_finite, check_out, check_threads,
                    progress_on)

# The default: ATTA-1 with fastadv's free step (the training backward's input gradient moves
# the cached perturbation once more). Over 5 seeds on MNIST-5k it ends 1.3 ± 2.3 points
# behind PGD-10 AT at 1.88x standard training's time (benchmarks/RESULTS_train_cpu.md).
RECOMMENDED = "atta"
RECOMMENDED_OPTIONS = {"free_step": True}

# Training ran to its end and wrote its weights and history, but the model it ends with
# cannot be attacked (its training collapsed with no earlier epoch to go back to): not a
# usable robust model, so not 0, and not 2 (which says the command line was wrong).
EXIT_COLLAPSED = 1
EXIT_STATUS = ("exit status: 0 trained and evaluated (a collapse after a good epoch puts that "
               "epoch's weights back and still ends 0); 1 trained, weights and history.json written, "
               "but training collapsed with no earlier epoch to go back to, so the final model's "
               "robust accuracy cannot be measured (NaN in history.json, with the reason); "
               "2 bad arguments; 130 interrupted (rerun to resume)")


def method_options(method: str, pairs=()) -> dict:
    """``--option`` pairs as keyword arguments, with the recommended options filled in for
    the recommended method (an explicit ``--option free_step=false`` wins)."""
    opts = _options(pairs)
    if method == RECOMMENDED:
        for k, v in RECOMMENDED_OPTIONS.items():
            opts.setdefault(k, v)
    return opts


def add_arguments(parser) -> None:
    from fastadv.train.methods import METHODS

    g = parser.add_argument_group("method")
    g.add_argument("--method", default=RECOMMENDED, choices=sorted(METHODS),
                   help=f"training method (default {RECOMMENDED})")
    g.add_argument("--eps", type=budget, default=None,
                   help="L∞ radius, a number or a fraction such as 8/255 (default 0.3 on mnist5k, 0.2 on digits)")
    g.add_argument("--alpha", type=budget, default=None, help="attack step (default: the method's rule)")
    g.add_argument("--steps", type=int, default=None, help="attack steps (default: the method's)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. beta=6 (trades), replays=8 (free), outer=5 (yopo); repeatable")
    g.add_argument("--eps-warmup", type=float, default=None,
                   help="epochs of linear eps ramp-up (default 2 on mnist5k, else 0)")
    g = parser.add_argument_group("data and model")
    g.add_argument("--data", default="mnist5k", choices=["mnist5k", "digits"], help="embedded data set")
    g.add_argument("--n-test", type=int, default=1000, help="held-out samples")
    g.add_argument("--n-train", type=int, default=None, help="use only this many training samples (default: all)")
    g.add_argument("--model", default="small_cnn", choices=["small_cnn", "preact_resnet18"], help="zoo model")
    g.add_argument("--width", type=int, default=16, help="SmallCNN width")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="passes over the training data")
    g.add_argument("--batch-size", type=int, default=64, help="training batch size")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="optimizer")
    g.add_argument("--lr", type=float, default=None, help="peak LR (default 1e-3 adam, 0.05 sgd)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov when > 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--schedule", default="none",
                   choices=["none", "constant", "cyclic", "one_cycle", "piecewise"], help="LR schedule")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="mixed-precision training (default: fp32)")
    g.add_argument("--attack-amp", default="same", choices=["same", "fp32", "bf16", "fp16"],
                   help="precision of the training attacks ('same': as --amp)")
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels_last layout for conv nets")
    g = parser.add_argument_group("run")
    g.add_argument("--out", default="fastadv-train", help="directory for checkpoints, history, weights")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="BATCHES",
                   help="also checkpoint every this many batches (default: once per epoch)")
    g.add_argument("--guard-size", type=int, default=512,
                   help="held-out points of the catastrophic-overfitting guard")
    g.add_argument("--guard-steps", type=int, default=10, help="PGD steps of the guard")
    g.add_argument("--co-drop", type=float, default=0.2,
                   help="a guard accuracy drop of more than this is a collapse")
    g.add_argument("--stop-on-collapse", action="store_true", help="stop training at a collapse")
    g.add_argument("--eval-steps", type=int, default=20, help="PGD steps of the final evaluation")
    g.add_argument("--safetensors", action="store_true", help="write weights as .safetensors")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialization, data order and attacks")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    add_progress(g)
    parser.epilog = EXIT_STATUS


def check_args(args) -> None:
    """The flags that only matter after training, checked before it starts."""
    for flag, v, lo in (("--width", args.width, 1), ("--epochs", args.epochs, 1),
                        ("--batch-size", args.batch_size, 1), ("--n-test", args.n_test, 1),
                        ("--n-train", args.n_train, 1), ("--eval-steps", args.eval_steps, 1),
                        ("--guard-size", args.guard_size, 1), ("--guard-steps", args.guard_steps, 1),
                        ("--checkpoint-every", args.checkpoint_every, 1), ("--steps", args.steps, 1)):
        at_least(flag, v, lo)
    check_threads("--threads", args.threads)
    check_finite("--eps", args.eps, 0.0, strict=True)
    check_finite("--alpha", args.alpha, 0.0, strict=True)
    check_finite("--lr", args.lr, 0.0, strict=True)
    check_finite("--eps-warmup", args.eps_warmup, 0.0)
    if args.eps is not None:
        from fastadv.budget import check_eps_budget
        check_eps_budget(args.eps, "Linf", 0.0, 1.0, name="--eps",
                         allow_name="an eps below 1 (training at an eps that covers the inputs is refused)")
    if args.device is not None:
        check_device("--device", args.device)
    check_out("--out", args.out)


def _options(pairs):
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--option: expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False, "none": None}.get(v.lower(), v)
    return out


def build(args):
    """(trainer, train_loader, test_loader, model) as the arguments say (DDP under torchrun)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fastadv import data, runs
    from fastadv.train import AdversarialTrainer
    from fastadv.train import distributed as dist_

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist_.init_from_env() if "RANK" in os.environ else torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    (xtr, ytr), (xte, yte) = data.load_dataset(args.data, n_test=args.n_test, seed=0)
    if args.n_train is not None:
        if args.n_train < 1:
            raise ValueError(f"--n-train: expected a positive count, got {args.n_train}")
        xtr, ytr = xtr[: args.n_train], ytr[: args.n_train]
    torch.manual_seed(args.seed)
    side = xtr.shape[-1]
    classes = max(10, int(ytr.max()) + 1)
    if args.model == "small_cnn":
        kwargs = {"in_channels": int(xtr.shape[1]), "num_classes": classes, "width": args.width,
                  "input_size": int(side)}
    else:
        kwargs = {"in_channels": int(xtr.shape[1]), "num_classes": classes}
    # the model is built from the spec it is recorded under, so `fastadv eval OUT` rebuilds it
    args.model_spec = {"name": args.model, "kwargs": kwargs}
    model = runs.build_model(args.model_spec).to(device)
    if dist_.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 0.05)
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum,
                              weight_decay=args.weight_decay, nesterov=args.momentum > 0)
    eps = args.eps if args.eps is not None else (0.3 if args.data == "mnist5k" else 0.2)
    cl = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    trainer = AdversarialTrainer(model, opt, method=args.method, eps=eps, alpha=args.alpha,
                                 steps=args.steps, amp=args.amp, attack_amp=args.attack_amp,
                                 scheduler=None if args.schedule == "none" else args.schedule,
                                 channels_last=cl, seed=args.seed + dist_.rank(),
                                 **method_options(args.method, args.option))
    indexed = args.method == "atta"
    if dist_.is_initialized():
        ds = TensorDataset(xtr, ytr)
        ds = data.IndexedDataset(ds) if indexed else ds
        loader = DataLoader(ds, batch_size=args.batch_size,
                            sampler=dist_.ShardedSampler(ds, seed=args.seed))
        tds = TensorDataset(xte, yte)
        test = DataLoader(tds, batch_size=500, sampler=dist_.ShardedSampler(tds, shuffle=False))
    else:
        loader = data.make_loader(xtr, ytr, batch_size=args.batch_size, indexed=indexed, seed=args.seed)
        test = data.make_loader(xte, yte, batch_size=500, shuffle=False)
    return trainer, loader, test, model


def final_evaluation(trainer, hist, test, steps: int, distributed: bool = False) -> dict:
    """Clean and PGD accuracy of the model ``fit`` ended with; where PGD cannot attack it (its
    output stopped depending on x, its logits are not finite), ``robust_acc`` is NaN and
    ``robust_error`` says why, instead of an exception that would lose the run's outputs."""
    last = hist[-1] if len(hist) else {}
    if distributed and "guard_error" in last and hist.best_epoch is None:
        # the guard's verdict is the same on every rank; an attack that fails on one rank only
        # would leave the others waiting in the all-reduce
        ev = trainer.evaluate(test, attack=False)
        return {**ev, "robust_acc": float("nan"), "robust_error": last["guard_error"]}
    try:
        return trainer.evaluate(test, steps=steps)
    except ValueError as exc:
        if not str(exc).startswith("model:"):   # the model's fault, not the arguments'
            raise
        ev = trainer.evaluate(test, attack=False)
        return {**ev, "robust_acc": float("nan"), "robust_error": str(exc)}


def run(args) -> int:
    try:
        trainer, loader, test, model = build(args)
    except (ValueError, TypeError, ImportError) as exc:
        print(f"fastadv train: {exc}", file=sys.stderr)
        return 2
    from fastadv import runs
    from fastadv._files import atomic_write_json
    from fastadv.train import checkpoint as ckpt
    from fastadv.train import distributed as dist_

    main = dist_.is_main()
    warm = args.eps_warmup if args.eps_warmup is not None else (2.0 if args.data == "mnist5k" else 0.0)
    desc = runs.run_description(args.model_spec["name"], args.model_spec["kwargs"], data=args.data,
                                eps=trainer.eps, norm="Linf", lower=trainer.lower, upper=trainer.upper,
                                n_test=args.n_test, method=args.method)
    if main:
        # written first: best.pt and last.pt (the trainer's own files) are described by it
        runs.write_run_file(args.out, desc)
        print(f"fastadv train: {trainer!r} on {args.data} ({len(loader.dataset)} training samples), "
              f"{args.epochs} epoch{'s' if args.epochs != 1 else ''} -> {args.out}", flush=True)
    try:
        hist = trainer.fit(loader, args.epochs, val_loader=test, checkpoint_dir=args.out,
                           resume=not args.no_resume, checkpoint_every=args.checkpoint_every,
                           guard_size=args.guard_size, guard_steps=args.guard_steps,
                           co_drop=args.co_drop, stop_on_collapse=args.stop_on_collapse,
                           best_format="safetensors" if args.safetensors else "pt",
                           eps_warmup=warm, progress=progress_on(args.progress) and main, verbose=main)
    except (ValueError, TypeError) as exc:
        print(f"fastadv train: {exc}", file=sys.stderr)
        return 2
    ev = final_evaluation(trainer, hist, test, args.eval_steps, distributed=dist_.is_initialized())
    if main:
        name = "final.safetensors" if args.safetensors else "final.pt"
        ckpt.save_weights(trainer.module.state_dict(), os.path.join(args.out, name),
                          runs.weights_metadata(desc, method=args.method, eps=trainer.eps))
        atomic_write_json({"config": trainer.config(), "run": desc, "history": list(hist), "final": ev,
                           "best_epoch": hist.best_epoch, "collapsed_epochs": hist.collapsed_epochs},
                          os.path.join(args.out, "history.json"))
        t = sum(r["time"] for r in hist)
        measured = "robust_error" not in ev
        pgd = f"{ev['robust_acc']:.1%}" if measured else "not measurable"
        print(f"\n| method | eps | epochs | train time (s) | clean | PGD-{args.eval_steps} |")
        print("|---|---|---|---|---|---|")
        print(f"| {args.method} | {trainer.eps:.3g} | {len(hist)} | {t:.1f} | {ev['clean_acc']:.1%} | "
              f"{pgd} |")
        if not measured:
            why = ("" if not hist.collapsed else
                   f"catastrophic overfitting at epoch(s) {hist.collapsed_epochs} and no earlier epoch to go "
                   f"back to: " if hist.best_epoch is None else
                   f"catastrophic overfitting at epoch(s) {hist.collapsed_epochs} and the best weights "
                   f"(epoch {hist.best_epoch}) could not be put back: ")
            print(f"{why}the final model's robust accuracy cannot be measured ({ev['robust_error']})")
        elif hist.collapsed:
            print(f"catastrophic overfitting at epoch(s) {hist.collapsed_epochs}; "
                  f"kept the weights of epoch {hist.best_epoch}")
        best_note = "best.* is the best guard epoch, " if hist.best_epoch is not None else ""
        print(f"\nweights: {os.path.join(args.out, name)} (the model above; {best_note}last.pt the "
              f"checkpoint a rerun resumes from)")
        if measured:
            print(f"evaluate it (AutoAttack, report in fastadv-report/):\n  fastadv eval {shlex.quote(args.out)}")
        else:
            print("no point evaluating it under attack: train again (--no-resume) with a smaller --lr, "
                  "another --method or more --eps-warmup")
    dist_.shutdown()
    return 0 if "robust_error" not in ev else EXIT_COLLAPSED
