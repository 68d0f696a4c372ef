"""Compile checks of the CUDA sources where nvcc exists (no GPU needed).

kernels/*.cu must compile with plain ``nvcc -c`` (no PyTorch headers) for sm_80
and sm_90, also under the flags torch.utils.cpp_extension adds; the C launchers
must be exported; the host glue (csrc/cuda_ops.cpp) must compile against torch's
CUDA headers.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastadv import _build

ROOT = Path(__file__).resolve().parents[1]
NVCC = _build.find_nvcc()
CUDA_HOME = Path(_build.find_cuda_home() or "/nonexistent")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

KERNELS = sorted((ROOT / "kernels").glob("*.cu"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# what torch.utils.cpp_extension passes to nvcc, so the JIT/AOT builds see the same code
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]
LAUNCHERS = ["fastadv_linf_step_launch", "fastadv_linf_project_launch", "fastadv_l2_step_launch",
             "fastadv_l2_project_launch", "fastadv_l2_workspace_bytes", "fastadv_cuda_arch_list",
             "fastadv_cuda_runtime_version"]


def _nvcc(args, tmp_path):
    r = subprocess.run([NVCC, *args], capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return r


def test_every_listed_cuda_source_exists():
    listed = set(_build.read_sources(ROOT, cuda=True)) - set(_build.read_sources(ROOT, cuda=False))
    assert {f"kernels/{p.name}" for p in KERNELS} <= listed
    assert "csrc/cuda_ops.cpp" in listed


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Each kernel file compiled once (both archs, torch's flags), shared by the tests below."""
    out = tmp_path_factory.mktemp("nvcc")
    cache = {}

    def get(source):
        if source not in cache:
            obj = out / (source.stem + ".o")
            _nvcc(["-c", "-std=c++17", "-O3", *ARCHS, *TORCH_NVCC_FLAGS, str(source), "-o", str(obj)], out)
            cache[source] = obj
        return cache[source]
    return get


@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_for_sm80_and_sm90(source, objects):
    assert objects(source).stat().st_size > 0


def test_launchers_are_exported_and_report_the_archs(objects, tmp_path):
    objs = [str(objects(source)) for source in KERNELS]
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-g", "--defined-only", *objs], capture_output=True, text=True).stdout
        for name in LAUNCHERS:
            assert f" T {name}" in syms, name
    # A host program linked with the objects says which archs it holds; no GPU needed.
    main = tmp_path / "main.cpp"
    main.write_text('#include <cstdio>\n#include "fastadv_kernels.cuh"\n'
                    'int main() { std::printf("%s %d\\n", fastadv_cuda_arch_list(), '
                    'fastadv_cuda_runtime_version()); }\n')
    exe = tmp_path / "archs"
    _nvcc(["-std=c++17", f"-I{ROOT / 'kernels'}", str(main), *objs, "-o", str(exe)], tmp_path)
    cuda_lib = CUDA_HOME / "lib64"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cuda_lib}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    out = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    archs, runtime = out.stdout.split()
    assert archs == "800,900" and int(runtime) >= 11050


def test_header_api_is_plain_cxx(tmp_path):
    """csrc/cuda_ops.cpp includes the header with the host compiler: the C API must parse there."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    inc = CUDA_HOME / "include"
    src = tmp_path / "use.cpp"
    src.write_text('#include "fastadv_kernels.cuh"\n'
                   "size_t f() { return fastadv_l2_workspace_bytes(10, 5); }\n")
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", f"-I{inc}",
                        f"-I{ROOT / 'kernels'}", str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_cuda_glue_compiles_against_torch_cuda_headers(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    tinc = Path(torch.__file__).parent / "include"
    extra = []
    if not (tinc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        # A CPU build of torch ships c10/cuda headers without their generated config header.
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        extra = [f"-I{tmp_path / 'stub'}"]
    inc = CUDA_HOME / "include"
    r = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-DFASTADV_WITH_CUDA", f"-I{tinc}",
                        f"-I{tinc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{inc}", *extra,
                        str(ROOT / "csrc" / "cuda_ops.cpp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
