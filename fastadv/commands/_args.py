"""Argument helpers shared by the subcommands: budgets written as fractions, count and
thread checks, output paths checked before work, and one progress switch for all."""
from __future__ import annotations

import argparse
import math
import sys

__all__ = ["budget", "at_least", "check_threads", "add_progress", "progress_on", "check_out",
           "check_device"]


def budget(text: str) -> float:
    """An ε or step size as the field writes it: ``0.03``, ``8/255``, ``2e-3``."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/")   # exactly one '/': anything else is a ValueError
            den_v = float(den)
            if den_v == 0:
                raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, "
                                                 f"got {text!r} (division by zero)")
            return float(num) / den_v
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


def at_least(flag: str, v, lo: int) -> None:
    """A ValueError naming ``flag`` unless ``v`` (an int, or None: unset) is >= ``lo``."""
    if v is not None and v < lo:
        raise ValueError(f"{flag}: expected an integer >= {lo}, got {v}")


def check_threads(flag: str, v) -> None:
    if v is not None and v < 1:
        raise ValueError(f"{flag}: expected a number of CPU threads >= 1, got {v}")


def check_finite(flag: str, v, lo: float = None, strict: bool = False) -> None:
    if v is None:
        return
    if not math.isfinite(v) or (lo is not None and (v <= lo if strict else v < lo)):
        rel = ">" if strict else ">="
        raise ValueError(f"{flag}: expected a finite number{'' if lo is None else f' {rel} {lo:g}'}, got {v}")


def add_progress(parser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars with totals and ETA (default: on when stderr is a "
                             "terminal, off otherwise)")


def progress_on(v) -> bool:
    return bool(sys.stderr.isatty()) if v is None else bool(v)


def check_out(flag: str, path: str) -> str:
    from .._files import check_output_dir
    return check_output_dir(flag, path)


def check_device(flag: str, device) -> None:
    """``device`` (None: the default) is a device this torch can use."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag}: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise ValueError(f"{flag}: {device!r} requested but CUDA is not available "
                         f"({why}: torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag}: expected cpu, cuda or cuda:N, got {device!r}")
