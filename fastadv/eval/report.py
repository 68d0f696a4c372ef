"""A robustness report: run the evaluation, write Markdown + JSON + PNG plots, resume if interrupted.

``evaluate(model, x, y, ...)`` runs AutoAttack (per-attack and worst-case robust
accuracy, per class), the gradient-masking self-checks, calibration under attack
and, on request, the robust-accuracy-vs-eps curve, transfer robustness from a
surrogate model and certified accuracy by randomized smoothing. Each finished
section is saved in ``state_path`` (JSON, next to AutoAttack's own ``.pt``
progress file), so a run that is interrupted picks up where it stopped.
``write_report(report, out_dir)`` writes ``report.md``, ``report.json`` and the plots.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .._files import atomic_savefig, atomic_write_json, atomic_write_text
from ..attacks.autoattack import AutoAttack, data_signature, model_signature
from ..attacks.base import int_arg, module_of, nonneg_numbers
from ..train import distributed as _dist
from . import masking, metrics, sharded, smoothing

__all__ = ["evaluate", "write_report", "load_state"]


def _progress_factory(enabled: bool, suffix: str = ""):
    """(callback(attack, n_points, total), close): a tqdm bar per attack with its total and
    ETA (a printed line per chunk without tqdm). AutoAttack calls back with n_points 0 as
    each attack starts, with its total (the points still robust then, less those it tried
    before a resume), so the bar shows the total and its clock runs from the start."""
    if not enabled:
        return (lambda name, n, total=None: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    bars: Dict[str, object] = {}
    done: Dict[str, int] = {}

    def cb(name, n, total=None):
        if name not in done:
            done[name] = 0
            if tqdm is not None:
                bars[name] = tqdm(desc=name + suffix, total=total, unit="pt", leave=True, dynamic_ncols=True)
            elif not n:
                print(f"  {name}{suffix}: {total} points to attack", flush=True)
        if not n:
            return
        done[name] += n
        if name in bars:
            bars[name].update(n)
        else:
            print(f"  {name}{suffix}: {done[name]}{'' if total is None else f'/{total}'} points", flush=True)

    def close():
        for b in bars.values():
            b.close()
    return cb, close


def load_state(path: Optional[str]) -> Dict[str, object]:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _save_state(path: Optional[str], state: Dict[str, object]) -> None:
    if not path:
        return
    atomic_write_json(state, path, indent=1, default=_jsonable)


def _jsonable(v):
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def _json_ready(v):
    """``v`` as it reads back from the state file (tuples -> lists, tensors -> lists), for
    comparisons with what was saved."""
    return json.loads(json.dumps(v, sort_keys=True, default=_jsonable))


def _check_evaluate_args(x, y, *, bs, steps, n_queries, eps_curve, eps_curve_steps, surrogate, smoothing_sigma, smoothing_n0,
                         smoothing_n, smoothing_alpha, smoothing_radii, smoothing_points, n_classes,
                         state_path, log) -> None:
    """Every argument that is only used after AutoAttack, checked before it starts."""
    int_arg("bs", bs, 1)
    int_arg("steps", steps, 1)
    int_arg("n_queries", n_queries, 1)
    if eps_curve:
        metrics.check_eps_list(eps_curve)
        int_arg("eps_curve_steps", eps_curve_steps, 1)
    if surrogate is not None and not callable(surrogate):
        raise TypeError(f"surrogate: expected a model (nn.Module or callable), got {type(surrogate).__name__}")
    if smoothing_sigma is not None:
        smoothing.check_sigma(smoothing_sigma, "smoothing_sigma")
        int_arg("smoothing_n0", smoothing_n0, 1)
        int_arg("smoothing_n", smoothing_n, 1)
        smoothing.check_alpha(smoothing_alpha, "smoothing_alpha")
        if smoothing_points is not None:
            int_arg("smoothing_points", smoothing_points, 1)
        nonneg_numbers("smoothing_radii", smoothing_radii)
    if n_classes is not None:
        int_arg("n_classes", n_classes, 1)
        if isinstance(y, Tensor) and y.numel() and not y.is_floating_point() and int(y.max()) >= n_classes:
            raise ValueError(f"n_classes: expected more than the largest label {int(y.max())}, got {n_classes}")
    if state_path is not None and not isinstance(state_path, (str, os.PathLike)):
        raise TypeError(f"state_path: expected a file path or None, got {type(state_path).__name__}")
    if not callable(log):
        raise TypeError(f"log: expected a callable taking a string, got {type(log).__name__}")


def evaluate(model, x: Tensor, y: Tensor, *, norm: str = "Linf", eps: float = 8 / 255,
             version: str = "standard", attacks_to_run: Sequence[str] = (), bs: int = 250,
             steps: int = 100, n_queries: int = 5000, seed: int = 0,
             eps_curve: Optional[Sequence[float]] = None, eps_curve_steps: int = 100,
             surrogate=None, smoothing_sigma: Optional[float] = None, smoothing_n0: int = 100,
             smoothing_n: int = 1000, smoothing_alpha: float = 0.001,
             smoothing_radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
             smoothing_points: Optional[int] = None, calibration: bool = True,
             masking_checks: bool = True, n_classes: Optional[int] = None,
             state_path: Optional[str] = None, progress: bool = True,
             log: Callable[[str], None] = print, **attack_kwargs) -> Dict[str, object]:
    """Run the evaluation and return the report as a dict (JSON-ready).

    ``attack_kwargs`` (``normalization=(mean, std)``, ``lower``/``upper``, ``amp``, ...)
    configure every attack, and ``normalization`` every model call; the surrogate of
    the transfer section sees pixel-space input. A section saved in ``state_path`` is
    reused only when everything it depends on (the data, the model's weights, its own
    settings) is unchanged; otherwise it is recomputed and the log says so. With a
    plain callable as model (or surrogate) nothing can be fingerprinted: the state is
    neither read nor written (a warning says so).

    Under ``torchrun`` (an initialized process group) AutoAttack is sharded over the
    ranks (``fastadv.eval.sharded``) and every rank gets its whole result; the other
    sections run on rank 0 only, which alone writes the state file, and the other
    ranks return the AutoAttack part of the report."""
    _check_evaluate_args(x, y, bs=bs, steps=steps, n_queries=n_queries, eps_curve=eps_curve, eps_curve_steps=eps_curve_steps,
                         surrogate=surrogate, smoothing_sigma=smoothing_sigma, smoothing_n0=smoothing_n0,
                         smoothing_n=smoothing_n, smoothing_alpha=smoothing_alpha,
                         smoothing_radii=smoothing_radii, smoothing_points=smoothing_points,
                         n_classes=n_classes, state_path=state_path, log=log)
    if state_path is not None:
        state_path = os.fspath(state_path)
    unhashable = [n for n, m in (("model", model), ("surrogate", surrogate))
                  if m is not None and module_of(m) is None]
    if state_path and unhashable:
        warnings.warn(f"evaluate: state_path={state_path!r} ignored, running from scratch: the "
                      f"{' and '.join(unhashable)} is a plain callable, whose weights cannot be "
                      "fingerprinted, so saved results could belong to another model", stacklevel=2)
        state_path = None
    main = _dist.is_main()
    aa_state = (state_path + ".autoattack.pt") if state_path else None
    if not main:
        state_path, progress, log = None, False, (lambda msg: None)
    normalization = attack_kwargs.get("normalization")
    # the generator's repr is its address: leave it out, the seed stands for it
    options = {k: v for k, v in attack_kwargs.items() if k != "generator"}
    cfg = {"norm": norm, "eps": eps, "version": version, "n": int(len(x)), "steps": steps,
           "n_queries": n_queries, "seed": seed, "attacks_to_run": list(attacks_to_run),
           "model_signature": model_signature(model),
           "data_signature": data_signature(x, y) if isinstance(x, Tensor) and isinstance(y, Tensor) else None,
           "attack_options": _json_ready(options)}
    # what each section depends on: a saved section is reused only if all of it is unchanged
    base = {"data": cfg["data_signature"], "model": cfg["model_signature"]}
    aa_deps = dict(base, norm=norm, eps=eps, version=version, attacks_to_run=list(attacks_to_run),
                   steps=steps, n_queries=n_queries, seed=seed, attack_options=options)
    wanted: Dict[str, Dict[str, object]] = {}
    if masking_checks:
        wanted["masking"] = aa_deps
    if calibration:
        wanted["calibration"] = aa_deps
    if eps_curve:
        wanted["eps_curve"] = dict(base, eps_curve=metrics.check_eps_list(eps_curve), steps=eps_curve_steps,
                                   norm=norm, seed=seed, attack_options=options)
    if surrogate is not None:
        wanted["transfer"] = dict(base, surrogate=model_signature(surrogate), eps=eps, norm=norm, steps=steps,
                                  seed=seed, attack_options=options)
    if smoothing_sigma is not None:
        wanted["smoothing"] = dict(base, sigma=smoothing_sigma, n0=smoothing_n0, n=smoothing_n,
                                   alpha=smoothing_alpha, radii=list(smoothing_radii), points=smoothing_points,
                                   seed=seed, normalization=normalization)
    wanted = {k: _json_ready(v) for k, v in wanted.items()}
    state = _reusable_state(load_state(state_path), cfg, wanted, state_path, log)
    sections: Dict[str, object] = state["sections"]
    if sections:
        log(f"resumed from {state_path}: reusing {', '.join(sections)} (computed earlier, nothing they "
            "depend on changed)")
    # the time each section took when it was computed: a reused one counts in the total
    times: Dict[str, float] = state.setdefault("times", {})
    reused_s = sum(times.values())
    t_start = time.perf_counter()
    mark = [t_start]

    def save() -> None:
        _save_state(state_path, state)

    # --- AutoAttack: per-attack and worst-case robust accuracy, per class -----------------
    aa = AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, verbose=False,
                    attacks_to_run=attacks_to_run, steps=steps, n_queries=n_queries,
                    checks=False, **attack_kwargs)
    resuming_aa = bool(aa_state) and os.path.exists(aa_state)
    # under torchrun the bars (rank 0's) count rank 0's shard of the points
    cb, close = _progress_factory(progress, " (rank 0's shard)" if _dist.world_size() > 1 else "")
    log(f"AutoAttack ({version}, {norm}, eps={eps:g}) on {len(x)} points: {', '.join(aa.attacks_to_run)}"
        + (f"; resuming from {aa_state}" if resuming_aa else ""))
    t0 = time.perf_counter()
    try:
        x_adv = sharded.run_standard_evaluation_sharded(aa, x, y, bs=bs, state_path=aa_state, progress=cb)
    finally:
        close()
    res = aa.last_result
    ex = res.extra
    if n_classes is None and len(x):
        n_classes = int(metrics.predict_logits(model, x[:1], normalization=normalization).shape[1])
    summary = metrics.accuracy_summary(y.cpu(), ex["clean"].cpu(), ex["robust"].cpu(),
                                       {k: v.cpu() for k, v in ex["per_attack"].items()},
                                       ex["attacks"], n_classes)
    summary["time_s"] = {k: float(v) for k, v in ex["time"].items()}
    summary["wall_s"] = time.perf_counter() - t0
    # AutoAttack's own state file resumes it: its earlier runs' attack time counts too
    aa_before = max(0.0, sum(summary["time_s"].values()) - summary["wall_s"])
    mark[0] = time.perf_counter()
    summary["attacks"] = ex["attacks"]
    nf = ex.get("nonfinite")
    if isinstance(nf, Tensor) and nf.shape[:1] == (len(x),):   # all the points, sharded or not
        summary["nonfinite"] = int(nf.sum())
    if aa_before > 0:
        log(f"AutoAttack resumed from {aa_state}: {aa_before:.1f} s of attack time from earlier runs reused")
    sections["autoattack"] = summary
    log(f"clean accuracy {summary['clean_accuracy']:.2%}, robust accuracy {summary['robust_accuracy']:.2%}")
    save()
    if not main:
        return {"config": cfg, "total_s": aa_before + time.perf_counter() - t_start, "autoattack": summary}

    def done(name: str, value) -> None:
        now = time.perf_counter()
        sections[name] = value
        state["keys"][name] = wanted[name]
        times[name] = now - mark[0]
        mark[0] = now
        save()

    # --- self-checks for gradient masking ----------------------------------------------------
    if masking_checks and "masking" not in sections:
        k = min(len(x), 64)
        checks = masking.run_model_checks(aa, x[:k].float(), y[:k], warn=True)
        checks.append(masking.square_beats_whitebox(res, warn=True))
        robust_idx = ex["robust"].nonzero().squeeze(1)[:32].cpu()
        if robust_idx.numel():
            xr, yr = x[robust_idx], y[robust_idx]
            kw = {k_: v for k_, v in attack_kwargs.items()
                  if k_ in ("lower", "upper", "normalization", "allow_large_eps")}
            checks.append(masking.check_large_eps(model, xr, yr, norm, None, 20, seed=seed, warn=True, **kw))
            checks.append(masking.check_more_effort(model, xr, yr, eps, norm, (10, 100), (1, 3), seed,
                                                    warn=True, **kw))
        done("masking", [c.to_dict() for c in checks])

    # --- calibration under attack --------------------------------------------------------------
    if calibration and "calibration" not in sections:
        done("calibration", metrics.calibration_under_attack(model, x, y, x_adv, bs=bs,
                                                             normalization=normalization))

    # --- robust accuracy vs eps ------------------------------------------------------------
    if eps_curve and "eps_curve" not in sections:
        log(f"robust accuracy vs eps ({len(eps_curve)} values, one pass)")
        curve = metrics.robust_accuracy_curve(model, x, y, eps_curve, norm=norm, steps=eps_curve_steps,
                                              seed=seed, bs=bs * 4, **attack_kwargs)
        curve.pop("robust")
        done("eps_curve", curve)

    # --- transfer (black-box) robustness -----------------------------------------------------
    if surrogate is not None and "transfer" not in sections:
        log("transfer robustness from the surrogate model")
        box = {k_: v for k_, v in attack_kwargs.items() if k_ in ("lower", "upper", "amp", "allow_large_eps")}
        tr = metrics.transfer_robustness(surrogate, model, x, y, eps, norm, steps=steps, seed=seed, bs=bs,
                                         target_normalization=normalization, **box)
        tr["white_box_robust_accuracy"] = summary["robust_accuracy"]
        done("transfer", tr)

    # --- certified robustness (randomized smoothing) ----------------------------------------
    if smoothing_sigma is not None and "smoothing" not in sections:
        m = len(x) if smoothing_points is None else min(len(x), smoothing_points)
        log(f"randomized smoothing: sigma={smoothing_sigma}, n0={smoothing_n0}, n={smoothing_n} on {m} points")
        pred, radius = smoothing.certify(model, x[:m], smoothing_sigma, smoothing_n0, smoothing_n,
                                         smoothing_alpha, batch_size=max(bs, 256), seed=seed,
                                         normalization=normalization)
        ca = smoothing.certified_accuracy(pred, radius, y[:m].cpu(), smoothing_radii)
        ca.update({"sigma": smoothing_sigma, "n0": smoothing_n0, "n": smoothing_n, "alpha": smoothing_alpha,
                   "points": m, "abstain": int((pred == smoothing.ABSTAIN).sum())})
        done("smoothing", ca)

    report = {"config": cfg, "total_s": reused_s + aa_before + time.perf_counter() - t_start, **sections}
    if reused_s or aa_before:
        report["resumed"] = True
    return report


def _reusable_state(old: Dict[str, object], cfg: Dict[str, object], wanted: Dict[str, object],
                    path: Optional[str], log: Callable[[str], None]) -> Dict[str, object]:
    """A fresh state holding the saved sections whose dependencies are unchanged; the log
    names the sections that are recomputed and what changed for them."""
    sections = old.get("sections") if isinstance(old.get("sections"), dict) else {}
    keys = old.get("keys") if isinstance(old.get("keys"), dict) else {}
    times = old.get("times") if isinstance(old.get("times"), dict) else {}
    state: Dict[str, object] = {"config": cfg, "sections": {}, "keys": {}}
    stale = []
    for name, deps in wanted.items():
        if name not in sections:
            continue
        saved = keys.get(name)
        if saved == deps:
            state["sections"][name] = sections[name]
            state["keys"][name] = deps
            t = times.get(name)
            state.setdefault("times", {})[name] = float(t) if isinstance(t, (int, float)) else 0.0
            continue
        changed = sorted(k for k in set(deps) | set(saved or {}) if (saved or {}).get(k) != deps.get(k))
        stale.append(f"{name} ({', '.join(changed)} changed)" if saved else f"{name} (saved by an older version)")
    if stale:
        log(f"state {path}: recomputing {'; '.join(stale)}")
    return state


# ------------------------------------------------------------------ writing
def eps_curve_points(report: Dict[str, object]):
    """(eps, robust accuracy) of the report's curve with ε = 0 (the clean accuracy) first."""
    c = report["eps_curve"]
    eps, acc = list(c["eps"]), list(c["robust_accuracy"])
    if not eps or eps[0] > 0:
        clean = c.get("clean_accuracy")
        if clean is None and "autoattack" in report:
            clean = report["autoattack"]["clean_accuracy"]
        if clean is not None:
            eps, acc = [0.0] + eps, [clean] + acc
    return eps, acc


def reliability_bins(bins: Dict[str, List[float]]) -> List[Dict[str, object]]:
    """The reliability diagram's bins: centre, width, count, accuracy and a state: "empty" (no
    points), "zero" (points, none right: a bar of height 0 that must still show) or "ok"."""
    edges = bins["edges"]
    out = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        n = int(bins["count"][i])
        acc = float(bins["accuracy"][i]) if n else 0.0
        out.append({"center": (a + b) / 2, "width": b - a, "count": n, "accuracy": acc,
                    "state": "empty" if n == 0 else ("zero" if acc == 0 else "ok")})
    return out


def _plots(report: Dict[str, object], out_dir: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files: List[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        p = os.path.join(out_dir, name)
        atomic_savefig(fig, p, dpi=120)
        plt.close(fig)
        files.append(p)

    def accuracy_axes(size, xlabel: str, ylabel: str = "accuracy"):
        fig, ax = plt.subplots(figsize=size)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        return fig, ax

    cfg = report.get("config", {})
    if "eps_curve" in report:
        c = report["eps_curve"]
        eps, acc = eps_curve_points(report)
        fig, ax = accuracy_axes((4.8, 3.4), f"eps ({c['norm']})", "robust accuracy")
        ax.plot(eps, acc, "o-", label=f"{', '.join(c['attacks'])} (ε = 0: clean)")
        if cfg.get("eps") is not None:
            ax.axvline(cfg["eps"], color="gray", linestyle=":", label=f"evaluated ε = {cfg['eps']:g}")
            if "autoattack" in report:
                ax.plot([cfg["eps"]], [report["autoattack"]["robust_accuracy"]], "r*", markersize=11,
                        label="AutoAttack at evaluated ε")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "eps_curve.png")
    if "calibration" in report:
        cal = report["calibration"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        for ax, key in zip(axes, ("clean", "adversarial")):
            rows = reliability_bins(cal[key]["bins"])
            w = rows[0]["width"]
            for r in rows:
                if r["state"] == "empty":   # no points: hatched grey, so it reads as "no data"
                    ax.bar(r["center"], 1.0, width=w, color="none", edgecolor="0.85", hatch="///",
                           linewidth=0.5)
                elif r["state"] == "zero":  # points, none right: a red floor bar and an x
                    ax.bar(r["center"], 0.02, width=w, color="tab:red", edgecolor="k")
                    ax.plot(r["center"], 0.0, "x", color="tab:red", markersize=7, clip_on=False)
                else:
                    ax.bar(r["center"], r["accuracy"], width=w, color="tab:blue", edgecolor="k", alpha=0.7)
                if r["count"]:
                    ax.text(r["center"], max(r["accuracy"], 0.02) + 0.015, str(r["count"]), ha="center",
                            va="bottom", fontsize=6, rotation=90)
            ax.plot([0, 1], [0, 1], "r--", linewidth=1)
            n = sum(r["count"] for r in rows)
            nonempty = [r for r in rows if r["count"]]
            note = " — accuracy 0 in every bin" if nonempty and all(r["state"] == "zero" for r in nonempty) else ""
            ax.set_title(f"{key}: ECE {cal[key]['ece']:.3f}, {n} points{note}", fontsize=9)
            ax.set_xlabel("confidence (numbers: points per bin)")
            ax.set_xlim(0, 1)
        from matplotlib.patches import Patch
        axes[0].set_ylabel("accuracy")
        axes[0].legend(handles=[Patch(facecolor="tab:blue", alpha=0.7, edgecolor="k", label="accuracy"),
                                Patch(facecolor="tab:red", edgecolor="k", label="points, accuracy 0"),
                                Patch(facecolor="none", edgecolor="0.7", hatch="///", label="empty bin")],
                       loc="upper left", fontsize=7)
        save(fig, "reliability.png")
    if "smoothing" in report:
        sm = report["smoothing"]
        fig, ax = accuracy_axes((4.5, 3.2), "L2 radius", "certified accuracy")
        ax.step(sm["radius"], sm["certified_accuracy"], where="post")
        ax.grid(alpha=0.3)
        save(fig, "certified.png")
    if "autoattack" in report:
        pc = report["autoattack"]["per_class"]
        idx = list(range(len(pc["clean"])))
        fig, ax = accuracy_axes((5.5, 3.2), "class")
        for shift, key in ((-0.2, "clean"), (0.2, "robust")):
            ax.bar([i + shift for i in idx], [0 if math.isnan(v) else v for v in pc[key]], 0.4, label=key)
        ax.set_xticks(idx)
        ax.legend(fontsize=8)
        save(fig, "per_class.png")
    return files


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def write_report(report: Dict[str, object], out_dir: str) -> Dict[str, str]:
    """Write report.md, report.json and PNG plots into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    plots = _plots(report, out_dir)
    cfg = report["config"]
    lines = ["# Robustness report", "",
             f"{cfg['n']} points, {cfg['norm']} eps = {cfg['eps']:g}, AutoAttack version "
             f"`{cfg['version']}`, seed {cfg['seed']}. Total time {report.get('total_s', 0):.1f} s"
             f"{' (with the earlier runs whose results it reused)' if report.get('resumed') else ''}.", ""]
    aa = report.get("autoattack")
    if aa:
        lines += ["## Accuracy", "", "| | accuracy |", "|---|---|",
                  f"| clean | {_pct(aa['clean_accuracy'])} |"]
        for k, v in aa.get("robust_accuracy_after", {}).items():
            lines.append(f"| robust after {k} | {_pct(v)} |")
        lines += [f"| **robust (worst case over all attacks)** | **{_pct(aa['robust_accuracy'])}** |", ""]
        lines += ["Points fooled first by each attack: " + ", ".join(
            f"{k}: {v}" for k, v in aa.get("fooled_by", {}).items()) + ".", ""]
        lines += ["Time per attack: " + ", ".join(f"{k} {v:.1f} s" for k, v in aa["time_s"].items()) + ".", ""]
        if aa.get("nonfinite"):
            lines += [f"**The model returned non-finite logits (NaN or inf)** at points tried for "
                      f"{aa['nonfinite']} of {aa['n']} inputs: no point counted as fooled on them, so "
                      "their robustness may be overstated.", ""]
        lines += ["### Per class", "", "| class | clean | robust |", "|---|---|---|"]
        for i, (c, r) in enumerate(zip(aa["per_class"]["clean"], aa["per_class"]["robust"])):
            lines.append(f"| {i} | {_pct(c)} | {_pct(r)} |")
        lines.append("")
    if "masking" in report:
        lines += ["## Gradient-masking self-checks", "", "| check | result |", "|---|---|"]
        for c in report["masking"]:
            lines.append(f"| {c['name']} | {'**WARNING**: ' + c['reason'] if c['fired'] else 'ok'} |")
        lines.append("")
    if "eps_curve" in report:
        c = report["eps_curve"]
        lines += ["## Robust accuracy vs eps", "", f"Attacks: {', '.join(c['attacks'])} (one pass over all eps).",
                  "", "| eps | robust accuracy |", "|---|---|"]
        lines += [f"| {e:g}{' (clean)' if e == 0 else ''}{' (evaluated)' if e == cfg['eps'] else ''} | {_pct(a)} |"
                  for e, a in zip(*eps_curve_points(report))]
        lines.append("")
    if "calibration" in report:
        cal = report["calibration"]
        lines += ["## Calibration under attack", "", "| input | accuracy | mean confidence | ECE |",
                  "|---|---|---|---|"]
        for k in ("clean", "adversarial"):
            lines.append(f"| {k} | {_pct(cal[k]['accuracy'])} | {cal[k]['mean_confidence']:.3f} | "
                         f"{cal[k]['ece']:.4f} |")
        lines.append("")
        bad = {k: cal[k].get("nonfinite", 0) for k in ("clean", "adversarial")}
        if any(bad.values()):
            lines += [f"Non-finite logits (NaN or inf) on {bad['clean']} clean and {bad['adversarial']} "
                      "adversarial inputs: counted as misclassified, left out of the ECE and the bins.", ""]
    if "transfer" in report:
        t = report["transfer"]
        lines += ["## Transfer (black-box) robustness", "",
                  "| | robust accuracy |", "|---|---|",
                  f"| white-box (AutoAttack) | {_pct(t['white_box_robust_accuracy'])} |",
                  f"| transfer from the surrogate | {_pct(t['transfer_robust_accuracy'])} |",
                  f"| the surrogate itself (white-box) | {_pct(t['surrogate_robust_accuracy'])} |", ""]
        bad = t.get("nonfinite") or {}
        if any(bad.values()):
            lines += ["Non-finite logits (NaN or inf), counted as neither correct nor fooled: "
                      + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items()) + ".", ""]
    if "smoothing" in report:
        s = report["smoothing"]
        lines += ["## Certified robustness (randomized smoothing)", "",
                  f"sigma = {s['sigma']}, n0 = {s['n0']}, n = {s['n']}, alpha = {s['alpha']}, "
                  f"{s['points']} points, {s['abstain']} abstained.", "",
                  "| L2 radius | certified accuracy |", "|---|---|"]
        lines += [f"| {r:g} | {_pct(a)} |" for r, a in zip(s["radius"], s["certified_accuracy"])]
        lines.append("")
    for p in plots:
        lines.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    md = os.path.join(out_dir, "report.md")
    atomic_write_text("\n".join(lines) + "\n", md)
    js = os.path.join(out_dir, "report.json")
    atomic_write_json(report, js, indent=2, default=_jsonable)
    return {"markdown": md, "json": js, **{os.path.basename(p): p for p in plots}}
