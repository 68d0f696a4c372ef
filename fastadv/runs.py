"""A training run read back: which checkpoint to evaluate, what a checkpoint file is, and the
trained model rebuilt from the checkpoint's own metadata.

``fastadv train --out RUN`` writes ``RUN/run.json`` (the model's architecture and size, the
data, ε, the input box and normalization) and puts the same description into the metadata
of the weights it writes (``final.*``; ``fastadv demo``'s ``model.*``), so
``load_trained(RUN)`` — and ``fastadv eval RUN`` — rebuild the very model that was trained
with nothing else said. ``best.*`` and ``last.pt`` (the trainer's own files) are described
by the ``run.json`` beside them; a zoo model's weights with neither are recognised by the
shapes of their tensors.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["RUN_FILE", "META_KEY", "CHECKPOINT_ORDER", "run_description", "weights_metadata",
           "write_run_file", "find_checkpoint", "read_checkpoint", "build_model", "infer_model_spec",
           "load_trained", "Checkpoint"]

RUN_FILE = "run.json"
META_KEY = "fastadv_run"          # metadata key of a weights file: the run description, as JSON
RUN_FORMAT = "fastadv.run/1"
# what `fastadv eval RUN` evaluates, first found first: the weights `fastadv train` reported
# on (final), the demo's model, the best guard epoch, then the training checkpoint itself
CHECKPOINT_ORDER = ("final.safetensors", "final.pt", "model.safetensors", "model.pt",
                    "best.safetensors", "best.pt", "last.pt", "previous.pt")
_WHAT = {"final": "the weights at the end of training, which its final table reports",
         "model": "the weights `fastadv demo` trained",
         "best": "the weights of the epoch with the best held-out PGD accuracy",
         "last": "the training checkpoint (weights, optimizer, RNG state) that a run resumes from",
         "previous": "the training checkpoint before last.pt, kept in case last.pt is damaged"}
_TRAINER_FORMAT_PREFIX = "fastadv.train/"


def run_description(model_name: str, model_kwargs: Dict[str, object], *, data: Optional[str],
                    eps: float, norm: str = "Linf", lower: float = 0.0, upper: float = 1.0,
                    normalization=None, n_test: Optional[int] = None, method: Optional[str] = None,
                    **extra) -> Dict[str, object]:
    """What ``load_trained`` needs to rebuild and evaluate a trained model (JSON-ready)."""
    get_model_class(model_name)  # a name build_model can rebuild, checked now
    out = {"format": RUN_FORMAT, "model": {"name": model_name, "kwargs": dict(model_kwargs)},
           "data": data, "n_test": n_test, "split_seed": 0, "eps": float(eps), "norm": norm,
           "lower": float(lower), "upper": float(upper),
           "normalization": None if normalization is None else [list(map(float, normalization[0])),
                                                                 list(map(float, normalization[1]))],
           "method": method}
    out.update(extra)
    return out


def weights_metadata(desc: Dict[str, object], **extra) -> Dict[str, str]:
    """Metadata for ``save_weights``: ``extra`` plus the run description under ``META_KEY``
    (strings only: safetensors stores nothing else)."""
    meta = {str(k): str(v) for k, v in extra.items()}
    meta[META_KEY] = json.dumps(desc, sort_keys=True)
    return meta


def write_run_file(directory: str, desc: Dict[str, object]) -> str:
    from ._files import atomic_write_json
    path = os.path.join(directory, RUN_FILE)
    atomic_write_json(desc, path, indent=1)
    return path


# ------------------------------------------------------------------ models
def get_model_class(name: str):
    from . import models
    table = {"small_cnn": models.SmallCNN, "preact_resnet18": models.PreActResNet18,
             "wide_resnet": models.WideResNet}
    if name not in table:
        raise ValueError(f"model: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def build_model(spec: Dict[str, object]) -> nn.Module:
    """The zoo model a spec ``{"name": ..., "kwargs": {...}}`` describes (fresh weights)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"model spec: expected {{'name': ..., 'kwargs': {{...}}}}, got {spec!r}")
    return get_model_class(spec["name"])(**dict(spec.get("kwargs") or {}))


def describe_spec(spec: Dict[str, object]) -> str:
    cls = get_model_class(spec["name"]).__name__
    kw = ", ".join(f"{k}={v}" for k, v in sorted((spec.get("kwargs") or {}).items()))
    return f"{cls}({kw})"


def infer_model_spec(state_dict: Dict[str, torch.Tensor]) -> Optional[Dict[str, object]]:
    """The zoo architecture whose parameters have exactly these names and shapes, or None."""
    sd = state_dict
    cands = []
    w0 = sd.get("features.0.weight")
    if isinstance(w0, torch.Tensor) and w0.dim() == 4:
        width, in_ch = int(w0.shape[0]), int(w0.shape[1])
        fc = sd.get("classifier.1.weight")
        last = sd.get("classifier.4.weight")
        if isinstance(fc, torch.Tensor) and isinstance(last, torch.Tensor):
            side = math.isqrt(max(int(fc.shape[1]) // (2 * width), 0))
            if side >= 1 and 2 * width * side * side == int(fc.shape[1]):
                cands.append({"name": "small_cnn", "kwargs": {
                    "in_channels": in_ch, "num_classes": int(last.shape[0]), "width": width,
                    "input_size": 4 * side, "batchnorm": "features.1.running_mean" in sd}})
    c1, lin = sd.get("conv1.weight"), sd.get("linear.weight")
    if isinstance(c1, torch.Tensor) and isinstance(lin, torch.Tensor) and c1.dim() == 4:
        if "layers.0.conv1.weight" in sd:
            cands.append({"name": "preact_resnet18", "kwargs": {
                "num_classes": int(lin.shape[0]), "in_channels": int(c1.shape[1])}})
    for spec in cands:   # a candidate counts only if every name and shape matches
        try:
            with torch.random.fork_rng(devices=[]):
                ref = build_model(spec).state_dict()
        except (TypeError, ValueError):
            continue
        if set(ref) == set(sd) and all(tuple(ref[k].shape) == tuple(sd[k].shape) for k in ref):
            return spec
    return None


# ------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A fastadv checkpoint file, read (weights_only) and identified."""
    path: str
    kind: str                                   # "weights" or "training"
    state_dict: Dict[str, torch.Tensor]
    metadata: Dict[str, object] = field(default_factory=dict)
    run: Optional[Dict[str, object]] = None     # the run description, if one was found
    run_source: Optional[str] = None            # where it came from
    spec: Optional[Dict[str, object]] = None    # the model's architecture
    spec_source: Optional[str] = None

    @property
    def role(self) -> str:
        base = os.path.basename(self.path).split(".")[0]
        return base if base in _WHAT else ("last" if self.kind == "training" else "weights")

    def describe(self) -> str:
        """One line: what this file is and what will be evaluated."""
        name = os.path.basename(self.path)
        what = _WHAT.get(self.role, "model weights")
        if self.kind == "training":
            what += f"; epoch {self.metadata.get('epoch')}, step {self.metadata.get('global_step')}: " \
                    "its model weights are used, the rest is for resuming"
        elif self.role == "best" and self.metadata.get("epoch") is not None:
            rob = self.metadata.get("robust_acc")
            try:
                rob_s = f", held-out PGD accuracy {float(rob):.1%}" if rob is not None else ""
            except (TypeError, ValueError):
                rob_s = ""
            what += f" (epoch {self.metadata.get('epoch')}{rob_s})"
        parts = [f"{name}: a fastadv {'training checkpoint' if self.kind == 'training' else 'weights file'}"
                 f" — {what}"]
        run = self.run or {}
        facts = []
        if self.spec is not None:
            facts.append(describe_spec(self.spec) + ("" if self.spec_source in ("metadata", None)
                                                     else f" [{self.spec_source}]"))
        if run.get("method") or self.metadata.get("method"):
            facts.append(f"method {run.get('method') or self.metadata.get('method')}")
        if run.get("data"):
            facts.append(f"data {run['data']}")
        eps = run.get("eps", self.metadata.get("eps"))
        if eps is not None:
            facts.append(f"eps {float(eps):g} ({run.get('norm', 'Linf')})")
        if facts:
            parts.append("; ".join(facts))
        return ". ".join(parts)


def find_checkpoint(run_dir: str) -> str:
    """The file ``fastadv eval RUN_DIR`` evaluates: the first of ``CHECKPOINT_ORDER`` present."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory: {run_dir!r} is not a directory")
    for name in CHECKPOINT_ORDER:
        p = os.path.join(run_dir, name)
        if os.path.isfile(p):
            return p
    raise ValueError(f"run directory: {run_dir!r} holds no fastadv checkpoint (expected one of "
                     f"{', '.join(CHECKPOINT_ORDER)}, as `fastadv train --out {run_dir}` writes)")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _expected(path: str) -> str:
    return (f"expected a fastadv checkpoint (best/final/last .pt or .safetensors from `fastadv "
            f"train`, model.* from `fastadv demo`); {path!r}")


def _read_safetensors(path: str, map_location) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    from .train import checkpoint as _ckpt
    try:
        import safetensors  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{path!r}: reading .safetensors needs the 'safetensors' package: "
                         "pip install safetensors") from exc
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*before checkpoints carried a checksum")
            sd, meta = _ckpt.load_weights_and_metadata(path, map_location=map_location)
    except Exception as exc:  # a foreign, corrupt or tampered file: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{_expected(path)} is not a readable safetensors file ({first})") from None
    return sd, dict(meta)


def _read_torch(path: str, map_location):
    from .train import checkpoint as _ckpt
    try:
        # a state dict from another tool has no fastadv checksum: no "written before checksums" note
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*before checkpoints carried a checksum")
            return _ckpt.load_checkpoint(path, map_location=map_location)
    except Exception as exc:  # a foreign pickle, a corrupt file, a failed checksum
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{_expected(path)} cannot be read as one ({first})") from None


def _run_beside(path: str) -> Optional[Dict[str, object]]:
    p = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_FILE)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as fh:
            run = json.load(fh)
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("format") == RUN_FORMAT else None


def read_checkpoint(path: str, map_location="cpu") -> Checkpoint:
    """Read and identify ``path``; a ValueError in one line saying what was expected when it
    is not a checkpoint fastadv (or a plain state dict of a zoo model) wrote."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: no such file {path!r}")
    if path.endswith(".safetensors"):
        sd, meta = _read_safetensors(path, map_location)
        kind = "weights"
    else:
        obj = _read_torch(path, map_location)
        if isinstance(obj, dict) and str(obj.get("format", "")).startswith(_TRAINER_FORMAT_PREFIX) \
                and _is_state_dict(obj.get("model")):
            kind, sd = "training", obj["model"]
            meta = dict(obj.get("config") or {})
            meta.update(epoch=obj.get("epoch"), global_step=obj.get("global_step"))
        elif isinstance(obj, dict) and _is_state_dict(obj.get("model")) and isinstance(obj.get("metadata"), dict):
            kind, sd, meta = "weights", obj["model"], dict(obj["metadata"])
        elif _is_state_dict(obj):
            kind, sd, meta = "weights", obj, {}
        elif isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
            kind, sd, meta = "weights", obj["state_dict"], {}   # a common wrapper of other tools
        else:
            got = (f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict)
                   else f"a {type(obj).__name__}")
            raise ValueError(f"{_expected(path)} holds {got}")
    ck = Checkpoint(path=path, kind=kind, state_dict=sd, metadata=meta)
    raw = meta.get(META_KEY)
    if isinstance(raw, str):
        try:
            run = json.loads(raw)
        except ValueError:
            run = None
        if isinstance(run, dict) and run.get("format") == RUN_FORMAT:
            ck.run, ck.run_source = run, "metadata"
    if ck.run is None:
        run = _run_beside(path)
        if run is not None:
            ck.run, ck.run_source = run, RUN_FILE
    if ck.run is not None and isinstance(ck.run.get("model"), dict):
        ck.spec, ck.spec_source = ck.run["model"], ck.run_source
    else:
        spec = infer_model_spec(sd)
        if spec is not None:
            ck.spec, ck.spec_source = spec, "architecture inferred from the tensor shapes"
    return ck


def load_trained(path: str, map_location="cpu") -> Tuple[nn.Module, Checkpoint]:
    """(model in eval mode with the trained weights, the identified checkpoint) from a run
    directory or a checkpoint file; a ValueError in one line when the architecture is unknown
    or the weights do not fit it."""
    if os.path.isdir(path):
        path = find_checkpoint(path)
    ck = read_checkpoint(path, map_location)
    if ck.spec is None:
        raise ValueError(f"checkpoint: {path!r} holds weights but says nothing of the architecture "
                         f"(no {RUN_FILE} beside it, not a zoo model's shapes): pass "
                         "--model module:function --weights FILE instead")
    with torch.random.fork_rng(devices=[]):   # the fresh init must not move the caller's RNG
        model = build_model(ck.spec)
    try:
        model.load_state_dict(ck.state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"checkpoint: the weights in {path!r} do not fit {describe_spec(ck.spec)} "
                         f"({first[1].strip() if len(first) > 1 else first[0] if first else exc})") from None
    return model.eval(), ck
