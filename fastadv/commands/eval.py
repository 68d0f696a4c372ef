"""``fastadv eval``: evaluate a model's robustness and write a Markdown + JSON + PNG report.

    fastadv eval RUN_DIR                           # what `fastadv train --out RUN_DIR` trained
    fastadv eval --checkpoint RUN_DIR/best.pt      # any fastadv checkpoint, rebuilt from its metadata
    fastadv eval                                   # a small CNN trained on the embedded MNIST-5k
    fastadv eval --model mypkg.nets:make --weights w.safetensors --data my_test.npz --eps 8/255
    fastadv eval --eps-curve 0.05,0.1,0.2,0.3 --transfer --smoothing-sigma 0.25

An interrupted run resumes from ``--state`` (default: ``<out>/state.json``). Under
``torchrun --nproc-per-node N -m fastadv eval ...`` AutoAttack is sharded over the N
ranks (one GPU each with NCCL, CPU processes with gloo) and rank 0 writes the report.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List

import torch

from ._args import add_progress, at_least, budget, check_device, check_out, check_threads, progress_on


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default=None, metavar="RUN_DIR",
                   help="a `fastadv train` output directory, or one of its checkpoint files: the "
                        "trained model, its data, eps and normalization are read from the "
                        "checkpoint's own metadata (default: none; see --model, --zoo)")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="a fastadv checkpoint file (final/best/last .pt or .safetensors, the demo's "
                        "model.*), rebuilt from its metadata; the same as giving it as RUN_DIR")
    g.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                   help="your own model: 'module:function' returning an nn.Module (logits out), "
                        "imported from the working directory too")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="weights for --model: .safetensors, a torch state dict, or a fastadv "
                        "checkpoint (loaded weights_only)")
    g.add_argument("--zoo", default="small_cnn", choices=["small_cnn"],
                   help="without a checkpoint or --model: a built-in model trained here on the "
                        "embedded data (cached)")
    g.add_argument("--normalization", default=None, metavar="MEANS;STDS",
                   help="'mean1,mean2,...;std1,std2,...' if the model expects normalised input (inputs "
                        "stay pixels in [0, 1]; default: the checkpoint's or the data file's, else none)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="DATA",
                   help="mnist5k or digits (embedded); a .pt/.npz/.safetensors file of tensors x, y; "
                        "a folder of class-named image folders; or module:function returning a "
                        "dataset, a loader or (x, y) (default: the checkpoint's data, else mnist5k)")
    g.add_argument("--n", "--points", dest="n", type=int, default=1000,
                   help="test points to evaluate, a seeded sample when the data holds more (--points: "
                        "the same; under torchrun without '--' torchrun reads --n as an abbreviation "
                        "of its own flags)")
    g = p.add_argument_group("attack")
    g.add_argument("--norm", default="Linf", choices=["Linf", "L2", "L1"], help="threat model")
    g.add_argument("--eps", type=budget, default=None,
                   help="the budget, a number or a fraction such as 8/255 (default: the checkpoint's; "
                        "else 0.3 (Linf), 2.0 (L2), 10 (L1) on mnist5k; 0.2, 0.6, 0.8 on digits)")
    g.add_argument("--allow-large-eps", action="store_true",
                   help="accept an eps that covers the whole input range (robust accuracy 0 by "
                        "construction; refused otherwise)")
    g.add_argument("--version", default="standard", choices=["standard", "plus", "rand", "custom"],
                   help="AutoAttack version")
    g.add_argument("--attacks", default="", help="comma-separated attack names, for --version custom")
    g.add_argument("--steps", type=int, default=100, help="APGD/FAB iterations (reference: 100)")
    g.add_argument("--n-queries", type=int, default=5000, help="Square queries (reference: 5000)")
    g.add_argument("--bs", type=int, default=250, help="points per chunk")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="mixed precision (default: exact fp32)")
    g.add_argument("--seed", type=int, default=0, help="attack seed")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g = p.add_argument_group("extra sections")
    g.add_argument("--eps-curve", default="", metavar="EPS,EPS,...",
                   help="comma-separated eps values (fractions allowed): robust accuracy vs eps")
    g.add_argument("--transfer", action="store_true",
                   help="transfer robustness from a surrogate (a second zoo model, other seed)")
    g.add_argument("--smoothing-sigma", type=float, default=None,
                   help="certify by randomized smoothing with this noise level (default: off)")
    g.add_argument("--smoothing-n", type=int, default=1000, help="smoothing: noise samples to certify")
    g.add_argument("--smoothing-n0", type=int, default=100, help="smoothing: noise samples to select the class")
    g.add_argument("--smoothing-alpha", type=float, default=0.001, help="smoothing: failure probability")
    g.add_argument("--smoothing-points", type=int, default=100, help="smoothing: points to certify")
    g.add_argument("--no-calibration", action="store_true", help="skip calibration under attack")
    g.add_argument("--no-checks", action="store_true", help="skip the gradient-masking self-checks")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="fastadv-report", help="directory for report.md/json and plots")
    g.add_argument("--state", default=None, help="resume file (default: <out>/state.json)")
    add_progress(g)


_DEFAULT_EPS = {"Linf": 0.3, "L2": 2.0, "L1": 10.0}


def _default_eps(data_name: str, norm: str) -> float:
    """The MNIST radii; on the 8×8 digits L∞ 0.2 as `fastadv train` uses there, and the
    L2/L1 radii scaled to 64 of MNIST's 784 pixels (√ and linear: 0.6, 0.8)."""
    if data_name == "digits":
        return {"Linf": 0.2, "L2": 0.6, "L1": 0.8}[norm]
    return _DEFAULT_EPS[norm]


def _cache_dir() -> str:
    return os.environ.get("FASTADV_CACHE", os.path.expanduser("~/.cache/fastadv"))


def zoo_small_cnn(data_name: str, seed: int = 0, epochs: int = 3, log=print) -> torch.nn.Module:
    """SmallCNN(width=16) trained on the data set's training split (cached on disk)."""
    from .. import data, models
    (xtr, ytr), _ = data.load_dataset(data_name, n_test=1000, seed=0)
    side = xtr.shape[-1]
    model = models.SmallCNN(width=16, input_size=side, num_classes=int(ytr.max()) + 1)
    path = os.path.join(_cache_dir(), f"zoo-small_cnn-{data_name}-s{seed}-torch{torch.__version__}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    log(f"training the built-in small CNN on {data_name} ({len(xtr)} points, {epochs} epochs, seed {seed})")
    g = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    torch.random.set_rng_state(torch_state)
    model.eval()
    os.makedirs(_cache_dir(), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def load_model(spec: str, weights: str = None, log=print) -> torch.nn.Module:
    """Build ``module:factory`` and load ``weights`` (.safetensors, a torch state dict or a
    fastadv checkpoint). When the weights are a fastadv checkpoint of a zoo model and the
    factory is that model's class, the class is called with the sizes the checkpoint records
    (``fastadv.models:SmallCNN`` + a width-16 run's weights just works). A spec, module,
    factory or weights file that does not work raises a ValueError."""
    from .. import data as _data
    from .. import runs
    factory = _data._import_callable(spec, "--model")
    ck = None
    if weights:
        if not os.path.isfile(weights):
            raise ValueError(f"--weights: no such file {weights!r}")
        try:
            ck = runs.read_checkpoint(weights)
        except ValueError as exc:
            raise ValueError(f"--weights: {exc}") from None
    kwargs = {}
    if ck is not None and ck.spec is not None and ck.spec_source in ("metadata", runs.RUN_FILE):
        try:
            same = factory is runs.get_model_class(ck.spec["name"])
        except ValueError:
            same = False
        if same:
            kwargs = dict(ck.spec.get("kwargs") or {})
            log(f"fastadv eval: building {runs.describe_spec(ck.spec)} as {os.path.basename(weights)} records")
    model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model: expected {spec!r} to return a torch.nn.Module, got {type(model).__name__}")
    if ck is not None:
        if ck.kind == "training" or ck.metadata:
            log(f"fastadv eval: --weights {ck.describe()}")
        try:
            model.load_state_dict(ck.state_dict)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
            hint = ""
            if ck.spec is not None:
                hint = (f"; the file holds {runs.describe_spec(ck.spec)}: `fastadv eval --checkpoint "
                        f"{weights}` rebuilds it")
            raise ValueError(f"--weights: do not fit the model of {spec!r} ({detail}){hint}") from None
    return model.eval()


def _floats(flag: str, text: str) -> List[float]:
    """Comma-separated finite numbers (fractions such as 8/255 allowed)."""
    out = []
    items = [v for v in text.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}")
    for v in items:
        try:
            f = budget(v)
        except argparse.ArgumentTypeError:
            raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{flag}: expected finite numbers, got {v.strip()!r}")
        out.append(f)
    return out


def check_args(args) -> dict:
    """Every flag checked before any work starts: the parsed values that need parsing
    (normalization, eps curve, attack list), or a ValueError naming the flag."""
    for flag, v in (("--n/--points", args.n), ("--bs", args.bs), ("--steps", args.steps),
                    ("--n-queries", args.n_queries), ("--smoothing-n", args.smoothing_n),
                    ("--smoothing-n0", args.smoothing_n0), ("--smoothing-points", args.smoothing_points)):
        at_least(flag, v, 1)
    check_threads("--threads", args.threads)
    if args.eps is not None and not (math.isfinite(args.eps) and args.eps >= 0):
        raise ValueError(f"--eps: expected a finite number >= 0, got {args.eps}")
    from ..attacks.base import nonneg_numbers
    from ..eval import smoothing
    if args.smoothing_sigma is not None:
        smoothing.check_sigma(args.smoothing_sigma, "--smoothing-sigma")
    smoothing.check_alpha(args.smoothing_alpha, "--smoothing-alpha")
    out = {"normalization": None, "eps_curve": None, "attacks": []}
    if args.normalization is not None:
        parts = args.normalization.split(";")
        if len(parts) != 2:
            raise ValueError(f"--normalization: expected 'mean1,mean2,...;std1,std2,...' (one ';'), "
                             f"got {args.normalization!r}")
        mean = _floats("--normalization", parts[0])
        std = _floats("--normalization", parts[1])
        if len(mean) != len(std):
            raise ValueError(f"--normalization: expected as many stds as means, got {len(mean)} means "
                             f"and {len(std)} stds")
        if any(v <= 0 for v in std):
            raise ValueError(f"--normalization: expected stds > 0, got {std}")
        out["normalization"] = (mean, std)
    if args.eps_curve:
        out["eps_curve"] = nonneg_numbers("--eps-curve", _floats("--eps-curve", args.eps_curve))
    from ..attacks.autoattack import ATTACK_NAMES
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACK_NAMES]
    if bad:
        raise ValueError(f"--attacks: unknown {bad}; expected names from {', '.join(ATTACK_NAMES)}")
    if args.version == "custom" and not attacks:
        raise ValueError(f"--attacks: --version custom needs a comma-separated list from {', '.join(ATTACK_NAMES)}")
    if attacks and args.version != "custom":
        raise ValueError("--attacks: only used with --version custom")
    out["attacks"] = attacks
    ckpt = args.checkpoint or args.run
    if args.checkpoint and args.run:
        raise ValueError(f"--checkpoint: give the checkpoint once, as RUN_DIR ({args.run!r}) or as "
                         f"--checkpoint ({args.checkpoint!r})")
    if ckpt and args.model:
        raise ValueError("--model: not used with a checkpoint, which names its own model; give one of them")
    if ckpt and args.weights:
        raise ValueError("--weights: not used with a checkpoint, which holds the weights; give one of them")
    if ckpt and not os.path.exists(ckpt):
        raise ValueError(f"{'--checkpoint' if args.checkpoint else 'RUN_DIR'}: no such file or directory {ckpt!r}")
    if args.weights and not args.model:
        if ckpt:
            raise ValueError("--weights: not used with a checkpoint, which holds the weights; give one of them")
        if not os.path.isfile(args.weights):
            raise ValueError(f"--weights: no such file {args.weights!r}")
    if args.transfer and args.data is not None and args.data not in _EMBEDDED:
        raise ValueError(f"--transfer: its surrogate is a zoo model trained on the embedded data "
                         f"({' or '.join(_EMBEDDED)}), not on {args.data!r}")
    check_device("--device", args.device)
    check_out("--out", args.out)
    if args.state is not None:
        from .._files import check_output_file
        check_output_file("--state", args.state, create_dir=True)
    return out


_EMBEDDED = ("mnist5k", "digits")


def _resolve_model(args, log):
    """(model, name, run description or {}) from RUN_DIR/--checkpoint, --model or the zoo."""
    from .. import runs
    ckpt = args.checkpoint or args.run
    flag = "--checkpoint" if args.checkpoint else "RUN_DIR"
    if not ckpt and args.weights and not args.model:
        # weights alone: a fastadv checkpoint names its model (anything else needs --model)
        ckpt, flag = args.weights, "--weights"
    if ckpt:
        try:
            path = runs.find_checkpoint(ckpt) if os.path.isdir(ckpt) else ckpt
            model, ck = runs.load_trained(path)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
        log(f"fastadv eval: {ck.describe()}")
        return model, path, dict(ck.run or {}), ck
    if args.model:
        return load_model(args.model, args.weights, log=log), args.model, {}, None
    data = args.data or "mnist5k"
    if data not in _EMBEDDED:
        raise ValueError(f"--data: the built-in model is trained on {' or '.join(_EMBEDDED)} only; for "
                         f"{data!r} give your model (--model module:function --weights FILE) or a "
                         "checkpoint (RUN_DIR)")
    return zoo_small_cnn(data), f"zoo:{args.zoo} ({data})", {}, None


def _check_model_runs(model, x, classes_needed: int, normalization=None) -> None:
    """One forward pass on one point: a model/data mismatch is one line now, not a traceback
    inside AutoAttack."""
    from ..eval.metrics import predict_logits
    try:
        out = predict_logits(model, x[:1], normalization=normalization)
    except Exception as exc:  # the user's model on the user's data: any error is theirs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"model: cannot run on the data's inputs of shape {list(x.shape[1:])} per point "
                         f"({type(exc).__name__}: {first}); check --data against the model") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"model: expected logits [B, classes], got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.shape[1] < classes_needed:
        raise ValueError(f"model: it has {out.shape[1]} outputs, but the data's labels go up to "
                         f"{classes_needed - 1}: check --data against the model")


def run(args) -> int:
    try:
        parsed = check_args(args)
    except ValueError as exc:
        print(f"fastadv eval: {exc}", file=sys.stderr)
        return 2
    from .. import data
    from ..budget import check_eps_budget
    from ..eval import report as _report
    from ..train import distributed as _dist
    if args.threads:
        torch.set_num_threads(args.threads)
    # under torchrun: join the group (AutoAttack is then sharded over the ranks)
    ddp_dev = _dist.init_from_env()
    main = _dist.is_main()
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    dev = torch.device(args.device) if args.device else ddp_dev
    try:
        model, name, run_desc, ck = _resolve_model(args, log)
        data_spec = args.data or run_desc.get("data") or "mnist5k"
        pts = data.load_data(data_spec, n=args.n, seed=0, n_test=run_desc.get("n_test") or 1000)
        if pts.total < args.n:
            log(f"fastadv eval: --n {args.n}: {data_spec} holds {pts.total} test points; "
                f"evaluating all {pts.total}")
        elif pts.total > args.n and data_spec not in _EMBEDDED:
            log(f"fastadv eval: {args.n} of the {pts.total} points of {data_spec} (a seeded sample; --n)")
        for note in pts.notes:
            log(f"fastadv eval: --data: {note}")
        x, y = pts.x, pts.y
        if not len(x):
            raise ValueError(f"--data: {data_spec!r} holds no points")
        normalization = parsed["normalization"]
        if normalization is None and run_desc.get("normalization"):
            normalization = tuple(run_desc["normalization"])
        if normalization is None and pts.normalization is not None:
            normalization = pts.normalization
            log(f"fastadv eval: normalization from the data file: mean {normalization[0]}, std {normalization[1]}")
        lower, upper = float(run_desc.get("lower", 0.0)), float(run_desc.get("upper", 1.0))
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("--data: expected finite input values, got NaN or inf")
        if lo < lower or hi > upper:
            raise ValueError(f"--data: expected pixel values in [{lower:g}, {upper:g}], got [{lo:.4g}, {hi:.4g}]: "
                             "store 0-255 images as uint8 (divided by 255 on reading) or scale them; "
                             "for a model that expects normalized input give unnormalized pixels and "
                             "--normalization 'means;stds'")
        if args.model and normalization is None:
            log("fastadv eval: the model sees the pixels as they are, in [0, 1]; if it expects "
                "normalized input, give --normalization 'means;stds'")
        eps = args.eps
        if eps is None:
            eps = run_desc.get("eps") if run_desc.get("norm", "Linf") == args.norm else None
        if eps is None:
            eps = _default_eps(data_spec if data_spec in _EMBEDDED else "mnist5k", args.norm)
        dim = int(x[0].numel())
        check_eps_budget(eps, args.norm, lower, upper, dim, args.allow_large_eps, name="--eps",
                         allow_name="--allow-large-eps")
        for e in parsed["eps_curve"] or []:
            check_eps_budget(e, args.norm, lower, upper, dim, args.allow_large_eps, name="--eps-curve",
                             allow_name="--allow-large-eps")
        model = model.to(dev).eval()
        _check_model_runs(model, x[:1].to(dev), int(y.max()) + 1, normalization)
        surrogate = None
        if args.transfer:
            if data_spec not in _EMBEDDED:
                raise ValueError(f"--transfer: its surrogate is a zoo model trained on the embedded data "
                                 f"({' or '.join(_EMBEDDED)}), not on {data_spec!r}")
            surrogate = zoo_small_cnn(data_spec, seed=1).to(dev).eval()
        kw = {}
        if normalization is not None:
            kw["normalization"] = normalization
        if (lower, upper) != (0.0, 1.0):
            kw.update(lower=lower, upper=upper)
        if args.amp:
            kw["amp"] = args.amp
        if args.allow_large_eps:   # checked above; the attacks check their own eps again
            kw["allow_large_eps"] = True
    except (ValueError, TypeError) as exc:   # the model, the data or a budget on the command line
        print(f"fastadv eval: {exc}", file=sys.stderr)
        return 2
    x, y = x.to(dev), y.to(dev)
    state = args.state or os.path.join(args.out, "state.json")
    # the flags were checked above; an error from here on is the model's or ours: a traceback
    rep = _report.evaluate(
        model, x, y, norm=args.norm, eps=eps, version=args.version, attacks_to_run=parsed["attacks"],
        bs=args.bs, steps=args.steps, n_queries=args.n_queries, seed=args.seed,
        eps_curve=parsed["eps_curve"], eps_curve_steps=args.steps, surrogate=surrogate,
        smoothing_sigma=args.smoothing_sigma, smoothing_n0=args.smoothing_n0, smoothing_n=args.smoothing_n,
        smoothing_alpha=args.smoothing_alpha, smoothing_points=args.smoothing_points,
        calibration=not args.no_calibration, masking_checks=not args.no_checks, state_path=state,
        progress=progress_on(args.progress), log=log, **kw)
    rep["config"]["model"] = name
    rep["config"]["data"] = data_spec
    rep["config"]["device"] = str(dev)
    if ck is not None:
        rep["config"]["checkpoint"] = ck.describe()
    if _dist.world_size() > 1:
        rep["config"]["ranks"] = _dist.world_size()
    if main:
        paths = _report.write_report(rep, args.out)
        print(f"report: {paths['markdown']} (json: {paths['json']})")
    _dist.shutdown()
    return 0
