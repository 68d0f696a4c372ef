"""fastadv: fast adversarial attacks and adversarial training on GPUs and CPUs.

``fastadv.ops`` (fused primitives) is imported eagerly; everything else loads on
first use, so ``import fastadv`` stays cheap and an optional dependency that is
missing only matters to the feature that needs it.
"""
from __future__ import annotations

import importlib

from ._version import __version__
from . import ops

# public name -> module that defines it
_LAZY = {
    # attacks (fastadv.attacks)
    "Attack": "fastadv.attacks", "AttackResult": "fastadv.attacks",
    "FGSM": "fastadv.attacks", "PGD": "fastadv.attacks", "PGDL2": "fastadv.attacks",
    "fgsm": "fastadv.attacks", "pgd": "fastadv.attacks", "pgd_l2": "fastadv.attacks",
    "APGD": "fastadv.attacks", "APGDT": "fastadv.attacks", "FABT": "fastadv.attacks",
    "FAB": "fastadv.attacks", "Square": "fastadv.attacks", "AutoAttack": "fastadv.attacks",
    "CW": "fastadv.attacks", "DeepFool": "fastadv.attacks",
    **{name: "fastadv.attacks" for name in (
        "BIM", "RFGSM", "FFGSM", "EOTPGD", "UPGD", "TPGD", "Jitter", "MIFGSM", "NIFGSM",
        "SINIFGSM", "VMIFGSM", "VNIFGSM", "DIFGSM", "TIFGSM", "PGDRS", "PGDRSL2", "PGDL2RS",
        "GN", "VANILA", "SparseFool", "OnePixel", "Pixle", "SPSA", "EADL1", "EADEN", "JSMA", "FMN")},
    "MultiAttack": "fastadv.attacks",
    # training (fastadv.train)
    "AdversarialTrainer": "fastadv.train",
}
_SUBMODULES = ("attacks", "losses", "data", "models", "train", "eval", "cli")

__all__ = ["__version__", "ops", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        mod = importlib.import_module(f"fastadv.{name}")
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'fastadv' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
