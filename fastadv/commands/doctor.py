"""``fastadv doctor``: versions, the GPU, each backend's state and the compiled extension."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from typing import Dict


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _nvcc_version(nvcc) -> str:
    if not nvcc:
        return "not found"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{nvcc} does not run"
    m = re.search(r"release ([\d.]+)", out)
    return f"{m.group(1) if m else '?'} ({nvcc})"


def report() -> Dict[str, object]:
    import torch

    import fastadv
    from fastadv import _build, ops

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    backends = ops.backends()  # may compile the extension the first time (one line says so)
    info = _build.build_info()
    return {
        "fastadv": fastadv.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_toolkit": _nvcc_version(_build.find_nvcc()),
        "gpus": gpus,
        "cpu_threads": torch.get_num_threads(),
        "backends": backends,
        "extension": info,
        "cache": str(_build.cache_root()),
        "env": {k: os.environ[k] for k in ("FASTADV_BACKEND", "FASTADV_CACHE", "FASTADV_NO_EXT",
                                            "TORCH_CUDA_ARCH_LIST", "CUDA_HOME") if k in os.environ},
    }


def format_report(r: Dict[str, object]) -> str:
    lines = [
        f"fastadv   {r['fastadv']}",
        f"python    {r['python']}",
        f"torch     {r['torch']} (CUDA {r['torch_cuda'] or 'none'})",
        f"triton    {r['triton']}",
        f"nvcc      {r['cuda_toolkit']}",
    ]
    if r["gpus"]:
        for g in r["gpus"]:
            lines.append(f"GPU {g['index']}     {g['name']}, compute capability {g['capability']}, "
                         f"{g['memory_gib']} GiB")
    else:
        lines.append("GPU       none visible")
    lines.append(f"CPU       {r['cpu_threads']} torch threads")
    lines.append("backends")
    for name, st in r["backends"].items():
        lines.append(f"  {name:<7} {'ready' if st is True else 'not ready: ' + str(st)}")
    ext = r["extension"]
    lines.append("extension")
    if ext.get("loaded"):
        archs = ", ".join(ext.get("cuda_archs") or []) or "none"
        lines.append(f"  {ext.get('kind')} build at {ext.get('path')}")
        lines.append(f"  CUDA code for: {archs}" + (f" (CUDA runtime {ext['cuda_runtime'] // 1000}."
                                                     f"{ext['cuda_runtime'] % 1000 // 10})"
                                                     if ext.get("cuda_runtime") else ""))
        if not ext.get("cuda"):
            lines.append(f"  no CUDA: {ext.get('cuda_skip_reason')}")
        lines.append(f"  CPU variants: {ext.get('cpu_isas')} (running: {ext.get('cpu_isa')}); "
                     f"OpenMP: {'yes' if ext.get('openmp') else 'no'}; {ext.get('compiler')}; "
                     f"built against torch {ext.get('torch_version')}")
    else:
        lines.append(f"  not loaded: {ext.get('error')}")
    for note in ext.get("notes") or []:
        lines.append(f"  note: {note}")
    lines.append(f"cache     {r['cache']}")
    for k, v in r["env"].items():
        lines.append(f"env       {k}={v}")
    return "\n".join(lines)


def run(args) -> int:
    r = report()
    if getattr(args, "json", False):
        print(json.dumps(r, indent=1, default=str))
    else:
        print(format_report(r))
    return 0
