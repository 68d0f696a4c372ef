"""Learning-rate schedules of adversarial training, as multipliers of each group's peak LR.

A schedule maps the fraction of training done (optimizer steps / total steps) to a
factor in [0, 1] applied to every parameter group's initial LR, which is the
peak. ``fit`` sets ``total_steps``; a loop that only calls ``step`` passes it.

- ``Cyclic``     triangular 0 → peak → 0 (Wong et al. 2020, "fast is better than free")
- ``OneCycle``   cosine warm-up then cosine annealing (Smith & Topin 2019)
- ``Piecewise``  constant with ×γ drops at milestones (Madry et al. 2018; Rice et al. 2020)
- ``Constant``
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

__all__ = ["Schedule", "Constant", "Cyclic", "OneCycle", "Piecewise", "get_schedule", "SCHEDULES"]


class Schedule:
    """Base: ``factor(progress)`` for progress in [0, 1]; ``schedule(step)`` for a step count."""

    kind = "base"

    def __init__(self, total_steps: Optional[int] = None):
        self.total_steps = None
        if total_steps is not None:
            self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> "Schedule":
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected an int >= 1, got {total_steps!r}")
        self.total_steps = total_steps
        return self

    def factor(self, progress: float) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            raise RuntimeError(f"{type(self).__name__}: total_steps is unknown; pass total_steps= "
                               f"when calling trainer.step() in your own loop (fit() sets it)")
        return self.factor(min(max(step, 0) / self.total_steps, 1.0))

    def config(self) -> Dict[str, object]:
        return {"kind": self.kind, "total_steps": self.total_steps}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({inner})"


class Constant(Schedule):
    kind = "constant"

    def factor(self, progress: float) -> float:
        return 1.0


class Cyclic(Schedule):
    """Linear from 0 up to the peak at ``peak_at`` of training, then linear down to 0."""

    kind = "cyclic"

    def __init__(self, peak_at: float = 0.4, total_steps: Optional[int] = None):
        if not 0.0 < peak_at < 1.0:
            raise ValueError(f"peak_at: expected 0 < peak_at < 1, got {peak_at}")
        self.peak_at = float(peak_at)
        super().__init__(total_steps)

    def factor(self, progress: float) -> float:
        if progress <= self.peak_at:
            return progress / self.peak_at
        return max(0.0, (1.0 - progress) / (1.0 - self.peak_at))

    def config(self):
        return {**super().config(), "peak_at": self.peak_at}


class OneCycle(Schedule):
    """Cosine from peak/div_factor up to the peak over ``pct_start``, then cosine down
    to peak/final_div_factor (the shape of torch's OneCycleLR, without momentum cycling)."""

    kind = "one_cycle"

    def __init__(self, pct_start: float = 0.25, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, total_steps: Optional[int] = None):
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"pct_start: expected 0 < pct_start < 1, got {pct_start}")
        if div_factor < 1 or final_div_factor < 1:
            raise ValueError("div_factor/final_div_factor: expected values >= 1")
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        super().__init__(total_steps)

    @staticmethod
    def _cos(a: float, b: float, t: float) -> float:
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))

    def factor(self, progress: float) -> float:
        lo = 1.0 / self.div_factor
        if progress <= self.pct_start:
            return self._cos(lo, 1.0, progress / self.pct_start)
        end = lo / self.final_div_factor
        return self._cos(1.0, end, (progress - self.pct_start) / (1.0 - self.pct_start))

    def config(self):
        return {**super().config(), "pct_start": self.pct_start, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor}


class Piecewise(Schedule):
    """The peak until the first milestone, then ×gamma at each milestone (fractions of training)."""

    kind = "piecewise"

    def __init__(self, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
                 total_steps: Optional[int] = None):
        ms = [float(m) for m in milestones]
        if any(not 0.0 < m < 1.0 for m in ms) or ms != sorted(ms):
            raise ValueError(f"milestones: expected increasing fractions in (0, 1), got {milestones!r}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma: expected 0 < gamma <= 1, got {gamma}")
        self.milestones = ms
        self.gamma = float(gamma)
        super().__init__(total_steps)

    def factor(self, progress: float) -> float:
        return self.gamma ** sum(progress >= m for m in self.milestones)

    def config(self):
        return {**super().config(), "milestones": list(self.milestones), "gamma": self.gamma}


SCHEDULES = {"constant": Constant, "cyclic": Cyclic, "one_cycle": OneCycle, "onecycle": OneCycle,
             "piecewise": Piecewise, "multistep": Piecewise}


def get_schedule(spec: Union[str, Schedule, None]) -> Optional[Schedule]:
    """A ``Schedule`` from a name ("cyclic", "one_cycle", "piecewise", "constant") or itself."""
    if spec is None or isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str) and spec.lower() in SCHEDULES:
        return SCHEDULES[spec.lower()]()
    raise ValueError(f"scheduler: expected None, one of {sorted(set(SCHEDULES))}, a "
                     f"fastadv.train.schedules.Schedule or a torch LR scheduler, got {spec!r}")
