"""The ``cpp`` and ``cuda`` backends: the compiled ``torch.ops.fastadv_ext`` kernels.

Both share one extension (fastadv._build): the cpp backend runs its CPU kernels,
the cuda backend its CUDA kernels. ``status()`` loads (and the first time maybe
compiles) the extension once and remembers the answer.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _build

Scalar = Union[float, Tensor]


def _split(v: Scalar) -> Tuple[Optional[Tensor], float]:
    """A float or per-sample tensor as the (tensor or None, float) pair the ops take."""
    if isinstance(v, Tensor):
        return v, 0.0
    return None, float(v)


def _arch_of(cap: Tuple[int, int]) -> int:
    return cap[0] * 100 + cap[1] * 10


class _NativeBackend:
    """Calls torch.ops.fastadv_ext.*; subclasses say where it can run."""

    name = ""
    device_type = ""

    def __init__(self) -> None:
        self._status: Union[None, bool, str] = None
        self._ops = None
        # Once ready: {op name: torch.ops.fastadv_ext.<op>.default}, which fastadv.ops calls
        # straight (the kernel checks its arguments) when no custom op is needed.
        self.kernels = None

    def status(self) -> Union[bool, str]:
        if self._status is None:
            self._status = self._check()
            if self._status is True:
                ns = torch.ops.fastadv_ext
                self._ops = (ns.linf_step.default, ns.l2_step.default,
                             ns.linf_project.default, ns.l2_project.default)
                self.kernels = dict(zip(("linf_step", "l2_step", "linf_project", "l2_project"),
                                        self._ops))
        return self._status

    def _check(self) -> Union[bool, str]:
        return _build.status()

    def supports(self, device: torch.device) -> Union[bool, str]:
        if torch.device(device).type == self.device_type:
            return True
        return f"the {self.name} backend runs on {self.device_type} tensors only"

    def _op(self, i: int):
        if self._ops is None:
            st = self.status()
            if st is not True:
                raise RuntimeError(f"fastadv: backend {self.name!r} is not available ({st})")
        return self._ops[i]

    def linf_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper) -> None:
        a_t, a = _split(alpha)
        e_t, e = _split(eps)
        self._op(0)(out, x_adv, x_nat, grad, a_t, a, e_t, e, float(lower), float(upper))

    def l2_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper) -> None:
        a_t, a = _split(alpha)
        e_t, e = _split(eps)
        self._op(1)(out, x_adv, x_nat, grad, a_t, a, e_t, e, float(lower), float(upper))

    def linf_project(self, out, x, x_nat, eps, lower, upper) -> None:
        e_t, e = _split(eps)
        self._op(2)(out, x, x_nat, e_t, e, float(lower), float(upper))

    def l2_project(self, out, x, x_nat, eps, lower, upper) -> None:
        e_t, e = _split(eps)
        self._op(3)(out, x, x_nat, e_t, e, float(lower), float(upper))


class CppBackend(_NativeBackend):
    name = "cpp"
    device_type = "cpu"


class CudaBackend(_NativeBackend):
    name = "cuda"
    device_type = "cuda"

    def _check(self) -> Union[bool, str]:
        if torch.version.cuda is None:
            return f"no CUDA device (this torch, {torch.__version__}, is built without CUDA)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        st = _build.status()
        if st is not True:
            return st
        info = _build.build_info()
        if not info.get("cuda"):
            why = info.get("cuda_skip_reason") or "built CPU-only"
            return (f"the loaded extension ({info.get('path')}) has no CUDA code ({why}); "
                    f"build one with `fastadv build`")
        archs = sorted(int(a) for a in str(info.get("cuda_arch_list", "")).split(",") if a.strip())
        # PTX (from a "+PTX" entry of the requested list) is compiled by the driver for newer GPUs.
        ptx = [int(float(t[:-4]) * 100) for t in str(info.get("arch_request") or "").split(";")
               if t.endswith("+PTX") and t[:-4].replace(".", "", 1).isdigit()]
        missing = []
        for i in range(torch.cuda.device_count()):
            sm = _arch_of(torch.cuda.get_device_capability(i))
            # SASS runs on GPUs of the same major version, not older than it was built for.
            if not any(a // 100 == sm // 100 and a <= sm for a in archs) and not any(p <= sm for p in ptx):
                missing.append(f"sm_{sm // 10}")
        if missing:
            have = ", ".join(f"sm_{a // 10}" for a in archs) or "none"
            want = ";".join(f"{int(m[3:]) // 10}.{int(m[3:]) % 10}" for m in sorted(set(missing)))
            return (f"the extension holds CUDA code for {have}, not for this GPU ({', '.join(missing)}); "
                    f"run `fastadv build --arch {want}`")
        return True


cpp_backend = CppBackend()
cuda_backend = CudaBackend()
