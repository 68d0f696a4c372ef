"""Builds the unmodified kernels/*.cu with g++ on the cuda_emu host emulation and runs them.

``build(variant)`` rewrites each kernel launch ``k<<<cfg>>>(args)`` to a call of the
emulator, compiles kernels/ with ``cuda_emu.h`` force-included, links the test driver
and caches the binary under ``$FASTADV_TEST_CACHE/cuda_emu`` keyed by a hash of every
input (sources, flags, compiler version). ``run(cases, variant)`` feeds the driver a
file of cases and returns each case's output tensor, error code and launch log.
Variants: ``plain`` (-O2), ``asan`` (AddressSanitizer + UBSan), ``tsan`` (ThreadSanitizer).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastadv import _build

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "kernels"

OPS = {"linf_step": 0, "linf_project": 1, "l2_step": 2, "l2_project": 3}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_COMMON = ["-std=c++17", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing",
           "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
# Low optimisation: compiling the kernels' many instantiations costs more than the runs
# (l2.cu: 4 s at -O1 vs 6 s at -O2; under ASan+UBSan 7 s at -O0 vs 26 s at -O1). TSan keeps
# -O1: 6 s to compile, and its runs take half as long as at -O0.
VARIANTS: Dict[str, List[str]] = {
    "plain": ["-O1"],
    "asan": ["-O0", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}
# What each variant's run needs from the environment: a finding must fail the run.
_RUN_ENV = {
    "plain": {},
    "asan": {"ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1:halt_on_error=1",
             "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
    "tsan": {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66:second_deadlock_stack=1"},
}


class EmuUnavailable(RuntimeError):
    """The emulation cannot be built here; the message says why (tests skip with it)."""


# ------------------------------------------------------------------ toolchain
def cuda_include() -> Path:
    """The CUDA toolkit's include directory, whose host-side fp16/bf16 headers the emulation uses."""
    home = _build.find_cuda_home()
    if home is None:
        raise EmuUnavailable("no CUDA toolkit (nvcc and its include/cuda_fp16.h) found: the emulation "
                             "takes the fp16/bf16 conversions from it")
    inc = Path(home) / "include"
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        if not (inc / name).is_file():
            raise EmuUnavailable(f"the CUDA toolkit at {home} has no include/{name}")
    return inc


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise EmuUnavailable("no host C++ compiler (g++) found")
    return cxx


def _compiler_version(cxx: str) -> str:
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else cxx


# ------------------------------------------------------------------ the rewrite
def _kernel_name_start(src: str, end: int) -> int:
    """Start of the kernel expression ending at ``end``: an identifier (with ``::``)
    and an optional template argument list."""
    i = end
    if i > 0 and src[i - 1] == ">":
        depth = 0
        for j in range(i - 1, -1, -1):
            if src[j] == ">":
                depth += 1
            elif src[j] == "<":
                depth -= 1
                if depth == 0:
                    i = j
                    break
        else:
            raise ValueError("unbalanced template arguments before <<<")
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(src: str) -> str:
    """``k<T>< <<cfg>>>(args)`` -> ``::cuda_emu::Launch(cfg).kernel(k<T>, "k<T>")(args)``."""
    out, pos = [], 0
    for m in re.finditer(r"<<<", src):
        if m.start() < pos:
            continue
        end = m.start()
        while end > 0 and src[end - 1].isspace():
            end -= 1
        start = _kernel_name_start(src, end)
        name = src[start:end]
        if not name or not (name[0].isalpha() or name[0] in "_:"):
            raise ValueError(f"cannot find the kernel before <<< at offset {m.start()}")
        close = src.index(">>>", m.end())
        cfg = src[m.end():close]
        label = " ".join(name.split()).replace("\\", "\\\\").replace('"', '\\"')
        out.append(src[pos:start])
        out.append(f'::cuda_emu::Launch({cfg}).kernel({name}, "{label}")')
        pos = close + 3
    out.append(src[pos:])
    return "".join(out)


# ------------------------------------------------------------------ building
def cache_dir() -> Path:
    base = os.environ.get("FASTADV_TEST_CACHE") or os.path.expanduser("~/.cache/fastadv-tests")
    return Path(base) / "cuda_emu"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _runtime_flags(variant: str) -> List[str]:
    """The scheduler's own bookkeeping must not look like races to ThreadSanitizer: the
    runtime is built without it and calls its fiber/sync API instead."""
    if variant == "tsan":
        return [f for f in VARIANTS[variant] if not f.startswith("-fsanitize")] + ["-DCUDA_EMU_TSAN"]
    return VARIANTS[variant]


def build(variant: str = "plain", kernels: Optional[Path] = None) -> Path:
    """The driver binary for ``variant`` over the kernel sources in ``kernels`` (default:
    the repository's kernels/), compiled once and cached; EmuUnavailable if it can't be.
    Objects are cached one by one, so a changed copy of one kernel file recompiles only it."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    kdir = Path(kernels) if kernels is not None else KERNELS
    inc, cxx = cuda_include(), compiler()
    tool = (cxx, _compiler_version(cxx), inc)
    flags = _COMMON + VARIANTS[variant]
    ksrc = {p.name: rewrite_launches(p.read_text())
            for p in sorted(kdir.iterdir()) if p.suffix in (".cu", ".cuh")}
    headers = [(n, t) for n, t in ksrc.items() if n.endswith(".cuh")]
    emu = {p.name: p.read_bytes() for p in sorted(HERE.iterdir()) if p.suffix in (".h", ".cpp")}
    objdir = cache_dir() / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=cache_dir()))
    try:
        srcdir = work / "kernels"
        srcdir.mkdir()
        for n, t in ksrc.items():
            (srcdir / n).write_text(t)
        jobs, objs = [], []
        for n, t in ksrc.items():
            if not n.endswith(".cu"):
                continue
            obj = objdir / f"{Path(n).stem}-{_digest(*tool, flags, n, t, headers, emu['cuda_emu.h'])}.o"
            objs.append(obj)
            if not obj.is_file():
                jobs.append(([cxx, *flags, "-x", "c++", "-include", str(HERE / "cuda_emu.h"),
                              f"-I{srcdir}", f"-I{HERE}", f"-I{inc}", "-c", str(srcdir / n)], obj))
        for name, fl in (("runtime", _COMMON + _runtime_flags(variant)), ("driver", flags)):
            obj = objdir / f"{name}-{_digest(*tool, fl, headers, sorted(emu.items()))}.o"
            objs.append(obj)
            if not obj.is_file():
                jobs.append(([cxx, *fl, f"-I{HERE}", f"-I{srcdir}", f"-I{inc}", "-c",
                              str(HERE / f"{name}.cpp")], obj))
        _run_jobs(jobs, work, parallel=2)
        out_dir = cache_dir() / f"{variant}-{_digest(*tool, flags, *sorted(o.name for o in objs))}"
        exe = out_dir / "driver"
        if not exe.is_file():
            _run_jobs([([cxx, *flags, *map(str, objs)], work / "driver")], work, parallel=1)
            out_dir.mkdir(exist_ok=True)
            os.replace(work / "driver", exe)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return exe


class BuildFailed(RuntimeError):
    """A compile or link step failed or warned; the message holds the compiler's output."""


def _run_jobs(jobs, work: Path, parallel: int) -> None:
    """Runs (command, output) compile/link jobs, ``parallel`` at a time; each output is
    written in ``work`` and moved into place only when its command succeeded without a
    warning (so the cache never holds a half-written or suspect object)."""
    pending = list(jobs)
    running = []
    errors = []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, out = pending.pop(0)
            tmp = work / f"{out.name}.tmp"
            running.append((subprocess.Popen([*cmd, "-o", str(tmp)], stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True), cmd, tmp, out))
        proc, cmd, tmp, out = running.pop(0)
        text, _ = proc.communicate()
        if proc.returncode != 0 or "warning" in text:
            errors.append(f"$ {' '.join(cmd)}\n{text}")
        else:
            os.replace(tmp, out)
    if errors:
        raise BuildFailed("\n".join(errors)[-8000:])


# ------------------------------------------------------------------ cases
@dataclass
class Case:
    """One launcher call. Tensors are dense CPU tensors of one shape, the batch first."""
    op: str
    x: torch.Tensor                       # x_adv for the steps, x for the projections
    x_nat: torch.Tensor
    grad: Optional[torch.Tensor] = None
    alpha: object = 0.0                   # float or float32 tensor [B]
    eps: object = 0.0
    lower: float = 0.0
    upper: float = 1.0
    sms: int = 4                          # the emulated device
    l2_bytes: int = 4 << 20
    offsets: Tuple[int, int, int, int] = (0, 0, 0, 0)  # elements: out, x, x_nat, grad
    in_place: bool = False                # out aliases x
    per_sample: Optional[int] = None      # overrides numel // B (to test the launchers' checks)
    plan_only: bool = False               # only ask for the L2 schedule (x, x_nat may be meta tensors)

    def header(self) -> bytes:
        b = self.x.shape[0]
        xs = self.x.element_size()
        gs = self.grad.element_size() if self.grad is not None else xs
        off = [self.offsets[0] * xs, self.offsets[1] * xs, self.offsets[2] * xs, self.offsets[3] * gs]
        at = isinstance(self.alpha, torch.Tensor)
        et = isinstance(self.eps, torch.Tensor)
        return struct.pack(
            "<15q4d", OPS[self.op], DTYPES[self.x.dtype],
            DTYPES[self.grad.dtype] if self.grad is not None else DTYPES[self.x.dtype],
            self.x.numel(), self.per_sample if self.per_sample is not None else (self.x.numel() // b if b else 1),
            self.sms, self.l2_bytes, *off,
            int(self.in_place), int(at), int(et), int(self.plan_only),
            0.0 if at else float(self.alpha), 0.0 if et else float(self.eps),
            float(self.lower), float(self.upper))

    def payload(self) -> bytes:
        if self.plan_only:
            return b""
        parts = [_bytes(self.x), _bytes(self.x_nat)]
        if self.op.endswith("step"):
            parts.append(_bytes(self.grad))
        for v in (self.alpha, self.eps):
            if isinstance(v, torch.Tensor):
                parts.append(_bytes(v.to(torch.float32)))
        return b"".join(parts)

    def reference(self) -> torch.Tensor:
        from fastadv.ops import reference as R
        if self.op.endswith("step"):
            return getattr(R, self.op)(self.x, self.x_nat, self.grad, self.alpha, self.eps,
                                       self.lower, self.upper)
        return getattr(R, self.op)(self.x, self.x_nat, self.eps, self.lower, self.upper)


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


@dataclass
class Result:
    out: torch.Tensor
    err: int
    workspace_bytes: int
    launches: List[Tuple[str, Tuple[int, int, int], Tuple[int, int, int]]] = field(default_factory=list)
    schedule: Optional["Schedule"] = None  # the L2 ops' schedule, as fastadv_l2_schedule_for says


@dataclass
class Schedule:
    blocks_per_sample: int   # 1: fused
    samples_per_group: int
    blocks: int
    workspace_bytes: int


class RunFailed(RuntimeError):
    """The driver exited non-zero: a sanitizer report, an emulator abort or a crash."""

    def __init__(self, variant: str, returncode: int, log: str):
        super().__init__(f"cuda_emu {variant} driver exited with {returncode}:\n{log[-6000:]}")
        self.variant, self.returncode, self.log = variant, returncode, log


def run(cases: Sequence[Case], variant: str = "plain", kernels: Optional[Path] = None,
        timeout: float = 600, env: Optional[Dict[str, str]] = None) -> List[Result]:
    exe = build(variant, kernels)
    with tempfile.TemporaryDirectory(prefix="cuda_emu-") as tmp:
        cases_file, out_file, meta_file = (Path(tmp) / n for n in ("cases", "out", "meta"))
        with open(cases_file, "wb") as f:
            for c in cases:
                f.write(c.header())
                f.write(c.payload())
        run_env = {**os.environ, **_RUN_ENV[variant], **(env or {})}
        r = subprocess.run([str(exe), str(cases_file), str(out_file), str(meta_file)],
                           capture_output=True, text=True, timeout=timeout, env=run_env)
        if r.returncode != 0:
            raise RunFailed(variant, r.returncode, r.stdout + r.stderr)
        raw = out_file.read_bytes()
        metas = [json.loads(line) for line in meta_file.read_text().splitlines()]
    if len(metas) != len(cases):
        raise RunFailed(variant, 0, f"{len(metas)} results for {len(cases)} cases")
    results, pos = [], 0
    for c, m in zip(cases, metas):
        n = 0 if c.plan_only else c.x.numel() * c.x.element_size()
        out = None if c.plan_only else torch.empty(c.x.shape, dtype=c.x.dtype)
        if n:
            out = torch.frombuffer(bytearray(raw[pos:pos + n]), dtype=torch.uint8).view(c.x.dtype)
        pos += n
        launches = [(name, tuple(g), tuple(b)) for name, g, b in m["launches"]]
        sched = Schedule(*m["schedule"]) if "schedule" in m else None
        results.append(Result(out if out is None else out.reshape(c.x.shape), m["err"], m["workspace_bytes"],
                              launches, sched))
    return results
