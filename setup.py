"""fastadv's build: pure Python by default, the native extension on request.

    pip install .                                        # pure Python; no compiler, no torch needed
    FASTADV_BUILD_EXT=1 pip install --no-build-isolation .
    FASTADV_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install --no-build-isolation .

Either way the C++/CUDA sources (csrc/, kernels/) are shipped inside the package
(fastadv/csrc, fastadv/kernels) so that the cpp/cuda backends can compile just in
time after a plain install. With FASTADV_BUILD_EXT=1 the extension is built now,
as ``fastadv._C``, from the one source list ``csrc/sources.txt``: with CUDA when
this torch has CUDA, a toolkit is found and there is a GPU or TORCH_CUDA_ARCH_LIST,
else CPU-only (it says why). It needs the torch you will run with, hence
--no-build-isolation.
"""
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
NATIVE_DIRS = ("csrc", "kernels")


def say(msg: str) -> None:
    print(f"fastadv setup.py: {msg}", file=sys.stderr, flush=True)


class BuildPyWithNativeSources(build_py):
    """Copy csrc/ and kernels/ into the built package as fastadv/csrc, fastadv/kernels."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds them beside the package
        for d in NATIVE_DIRS:
            src = ROOT / d
            if not src.is_dir():
                continue
            for f in sorted(src.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    dst = Path(self.build_lib, "fastadv", f.relative_to(ROOT))
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dst)


def _load_build_helpers():
    """fastadv/_build.py on its own (the package itself is not importable yet)."""
    spec = importlib.util.spec_from_file_location("_fastadv_build", ROOT / "fastadv" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def native_extension():
    """(ext_modules, cmdclass additions) for FASTADV_BUILD_EXT=1, else nothing."""
    if os.environ.get("FASTADV_BUILD_EXT", "0") != "1":
        say("pure-Python build (set FASTADV_BUILD_EXT=1 to compile the C++/CUDA extension now; "
            "otherwise it compiles just in time on first use)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit(
            "fastadv setup.py: FASTADV_BUILD_EXT=1 needs torch importable at build time; install torch "
            "first, then: FASTADV_BUILD_EXT=1 pip install --no-build-isolation .")
    helpers = _load_build_helpers()
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    why_not = None
    if torch.version.cuda is None:
        why_not = f"this torch ({torch.__version__}) has no CUDA"
    elif cpp_extension.CUDA_HOME is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME to one with bin/nvcc)"
    elif not archs and not torch.cuda.is_available():
        why_not = "no GPU visible and TORCH_CUDA_ARCH_LIST is not set (e.g. TORCH_CUDA_ARCH_LIST=9.0)"
    cuda = why_not is None
    if cuda:
        archs = helpers.normalize_arch_list(archs or helpers.visible_arch_list())
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        say(f"building fastadv._C with CUDA for {archs} and the CPU kernels")
    else:
        say(f"building fastadv._C CPU-only: {why_not}")
    flags = helpers.compile_flags(cuda)
    sources = helpers.read_sources(ROOT, cuda)
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = kind(
        name="fastadv._C",
        sources=sources,
        extra_compile_args={"cxx": flags["cflags"], "nvcc": flags["cuda_cflags"]} if cuda
        else {"cxx": flags["cflags"]},
        extra_link_args=flags["ldflags"],
    )
    manifest = {"torch": torch.__version__, "python": helpers.python_tag(), "cuda": cuda,
                "archs": archs if cuda else "", "sources_hash": helpers.sources_hash(ROOT, cuda),
                "kind": "installed"}
    if why_not:
        manifest["cuda_skip_reason"] = why_not

    class BuildExtWithManifest(cpp_extension.BuildExtension):
        """Also writes fastadv/_C.json: what the library was built for (the loader checks it)."""

        def run(self):
            super().run()
            for e in self.extensions:
                out = Path(self.get_ext_fullpath(e.name))
                (out.parent / "_C.json").write_text(json.dumps(manifest, indent=1))

    return [ext], {"build_ext": BuildExtWithManifest.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithNativeSources, **cmdclass})
