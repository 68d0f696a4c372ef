"""Finding, compiling and loading the native extension (csrc/ + kernels/).

The extension registers the ``torch.ops.fastadv_ext`` ops behind the ``cpp`` and
``cuda`` backends. ``load()`` gets it, the first hit winning:

1. an ahead-of-time build by ``fastadv build`` (``build()``), in
   ``$FASTADV_CACHE/aot-<torch>-<python>/``, when it matches this torch and the sources;
2. ``fastadv._C``, built by ``FASTADV_BUILD_EXT=1 pip install --no-build-isolation .``;
3. a just-in-time build with ``torch.utils.cpp_extension.load`` + ninja, cached in
   ``$FASTADV_CACHE/<torch>-<hash>/`` (``FASTADV_CACHE`` defaults to ``~/.cache/fastadv``).
   Compiling prints one line; a failure prints one line saying why (the full log
   stays in the cache) and the backends report not ready, so ops fall back to torch.

A JIT build includes CUDA when this torch has CUDA, a GPU is visible and a CUDA
toolkit of the same major version is found; otherwise it is CPU-only (a version
mismatch is said in one line, with what to do). The JIT cache key includes the host
compiler's and nvcc's versions, so a new toolchain builds anew. ``FASTADV_NO_EXT=1`` disables the
extension; ``FASTADV_SOURCE_DIR`` points at another source tree (tests use it).
The source list lives in one file, ``csrc/sources.txt``, read here, by setup.py
and by CMakeLists.txt.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

SOURCES_LIST = "csrc/sources.txt"
SOURCE_DIRS = ("csrc", "kernels")
AOT_NAME = "fastadv_ext_aot"
INSTALLED_MODULE = "fastadv._C"
_OK_FILE = "fastadv_build.json"   # written after a successful build: its presence means "complete"


class BuildError(RuntimeError):
    """The extension could not be found, built or loaded; the message is one line."""


# ------------------------------------------------------------------- sources
def source_root() -> Path:
    """The directory holding ``csrc/sources.txt``: an installed package or a checkout."""
    env = os.environ.get("FASTADV_SOURCE_DIR")
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / SOURCES_LIST).is_file():
            raise BuildError(f"FASTADV_SOURCE_DIR={env} has no {SOURCES_LIST}")
        return root
    pkg = Path(__file__).resolve().parent
    for cand in (pkg, pkg.parent):  # pip install . ships them in the package; a checkout has them beside it
        if (cand / SOURCES_LIST).is_file():
            return cand
    raise BuildError(f"the native sources ({SOURCES_LIST}) are not next to the fastadv package at {pkg}")


def read_sources(root: Path, cuda: bool) -> List[str]:
    """Source paths relative to ``root``: the cpu ones, plus the cuda ones when ``cuda``."""
    out = []
    for n, line in enumerate((root / SOURCES_LIST).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("cpu", "cuda"):
            raise BuildError(f"{root / SOURCES_LIST}:{n}: expected '<path> cpu|cuda', got {line!r}")
        if parts[1] == "cpu" or cuda:
            out.append(parts[0])
    return out


def sources_hash(root: Path, cuda: bool = True) -> str:
    """A digest of every file a build reads: csrc/, and kernels/ for a CUDA build."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS if cuda else SOURCE_DIRS[:1]:
        base = root / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(p.relative_to(root).as_posix().encode())
                h.update(b"\0")
                h.update(p.read_bytes())
                h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------- build setup
def cache_root() -> Path:
    return Path(os.environ.get("FASTADV_CACHE") or "~/.cache/fastadv").expanduser()


def python_tag() -> str:
    return f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}"


def cuda_toolkit() -> Optional[str]:
    """CUDA_HOME as torch.utils.cpp_extension finds it, or None."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        return None
    return CUDA_HOME if CUDA_HOME and Path(CUDA_HOME, "bin").is_dir() else None


def find_cuda_home() -> Optional[str]:
    """A CUDA toolkit (bin/nvcc and include/cuda_runtime.h), even if this torch has no CUDA."""
    import shutil

    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        cands.append(str(Path(on_path).resolve().parents[1]))
    cands.append("/usr/local/cuda")
    for home in cands:
        if home and Path(home, "bin", "nvcc").is_file() and Path(home, "include", "cuda_runtime.h").is_file():
            return home
    return None


def find_nvcc() -> Optional[str]:
    home = find_cuda_home()
    return str(Path(home, "bin", "nvcc")) if home else None


def cuda_skip_reason() -> Optional[str]:
    """Why a JIT build here would leave CUDA out, or None if it includes it."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if cuda_toolkit() is None:
        return "no CUDA toolkit found to compile the kernels (set CUDA_HOME to one with bin/nvcc)"
    return cuda_version_mismatch()


# ---------------------------------------------------------------- toolchain
@functools.lru_cache(maxsize=None)
def _version_line(cmd: str) -> str:
    """The line of ``cmd --version`` that names the version ('' if it does not run)."""
    try:
        out = subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in lines:
        if "release" in ln:  # nvcc: "Cuda compilation tools, release 13.0, V13.0.88"
            return ln
    return lines[0] if lines else ""


def host_compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension builds with (and nvcc hands host code to)."""
    return os.environ.get("CXX") or ("cl" if os.name == "nt" else "c++")


def nvcc_version(nvcc: Optional[str] = None) -> Optional[Tuple[int, int]]:
    """(major, minor) of nvcc (default: the toolkit a build would use), or None."""
    if nvcc is None:
        home = cuda_toolkit()
        nvcc = str(Path(home, "bin", "nvcc")) if home else None
    m = re.search(r"release (\d+)\.(\d+)", _version_line(nvcc)) if nvcc else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_version_mismatch() -> Optional[str]:
    """One line saying what to do when nvcc and this torch's CUDA differ in major version
    (the extension would not load, or torch's build refuses it), else None."""
    if torch.version.cuda is None:
        return None
    home = cuda_toolkit()
    got = nvcc_version(str(Path(home, "bin", "nvcc"))) if home else None
    want = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    if got is None or got[0] == want[0]:
        return None
    return (f"nvcc in {home} is CUDA {got[0]}.{got[1]} but this torch is built for CUDA {torch.version.cuda}: "
            f"set CUDA_HOME to a CUDA {want[0]}.x toolkit, or install a torch built for CUDA {got[0]}")


def toolchain(cuda: bool) -> Dict[str, str]:
    """The compilers' versions, part of the JIT cache key: a new compiler builds anew."""
    tools = {"cxx": f"{host_compiler()}: {_version_line(host_compiler())}"}
    if cuda:
        home = cuda_toolkit()
        nvcc = str(Path(home, "bin", "nvcc")) if home else "nvcc"
        tools["nvcc"] = f"{nvcc}: {_version_line(nvcc)}"
    return tools


def visible_arch_list() -> str:
    """The compute capabilities of the visible GPUs, as TORCH_CUDA_ARCH_LIST wants them."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


def normalize_arch_list(archs: str) -> str:
    """'9.0', '8.0;9.0', '8.0 9.0+PTX', 'sm_90', '90' -> '8.0;9.0+PTX' style."""
    items = []
    for tok in re.split(r"[;,\s]+", archs.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d+))?([a-z]?)(\+PTX)?", tok, re.IGNORECASE)
        if not m:
            raise BuildError(f"cannot read CUDA arch {tok!r}: expected e.g. 9.0, 8.0;9.0 or 9.0+PTX")
        major, minor, suffix, ptx = m.groups()
        if minor is None:  # '90' or 'sm_90'
            if len(major) < 2:
                raise BuildError(f"cannot read CUDA arch {tok!r}: expected e.g. 9.0")
            major, minor = major[:-1], major[-1]
        items.append(f"{int(major)}.{minor}{suffix.lower()}{'+PTX' if ptx else ''}")
    if not items:
        raise BuildError("empty CUDA arch list")
    return ";".join(dict.fromkeys(items))


def compile_flags(cuda: bool) -> Dict[str, List[str]]:
    """Flags for every build path (JIT, AOT, setup.py); CMake mirrors them."""
    if os.name == "nt":
        cflags = ["/O2"]
    else:
        # -ffp-contract=off: no fused multiply-add, so results round exactly as the reference's.
        # -g0: no debug info (Python's default CFLAGS carry -g, which made an 11 MB .so).
        cflags = ["-O3", "-ffp-contract=off", "-g0"]
        if torch.backends.openmp.is_available() and platform.system() != "Darwin":
            cflags.append("-fopenmp")  # at::parallel_for is inline OpenMP code
    ldflags = ["-fopenmp"] if "-fopenmp" in cflags else []
    nvcc = ["-O3", "-lineinfo"]
    if cuda:
        cflags.append("-DFASTADV_WITH_CUDA")
    return {"cflags": cflags, "cuda_cflags": nvcc, "ldflags": ldflags}


# ------------------------------------------------------------------- loading
_lock = threading.RLock()
_module = None                   # the loaded extension module (or a torch.ops library stand-in)
_origin: Dict[str, object] = {}  # where it came from: kind, path, manifest
_error: Optional[str] = None     # why it could not be had (one line)
_notes: List[str] = []           # candidates skipped on the way, for `fastadv doctor`


def _import_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def _torch_base_version() -> str:
    return torch.__version__.split("+")[0]


def aot_dir() -> Path:
    return cache_root() / f"aot-{torch.__version__}-{python_tag()}"


def _stale(root: Optional[Path], manifest: Dict[str, object]) -> bool:
    """Whether the sources here differ from those a manifest says it was built from."""
    if root is None or "sources_hash" not in manifest:
        return False
    return manifest["sources_hash"] != sources_hash(root, bool(manifest.get("cuda")))


def _try_aot(root: Optional[Path]):
    d = aot_dir()
    mf = d / _OK_FILE
    if not mf.is_file():
        return None
    try:
        manifest = json.loads(mf.read_text())
    except ValueError:
        _notes.append(f"ignored {d}: unreadable {_OK_FILE}")
        return None
    if manifest.get("torch") != torch.__version__:
        _notes.append(f"ignored {d}: built for torch {manifest.get('torch')}")
        return None
    if _stale(root, manifest):
        _notes.append(f"ignored {d}: the sources changed since it was built (run `fastadv build` again)")
        return None
    so = d / manifest.get("library", f"{AOT_NAME}.so")
    try:
        mod = _import_path(AOT_NAME, so)
    except Exception as exc:
        _notes.append(f"ignored {so}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    _origin.update(kind="aot", path=str(so), manifest=manifest)
    return mod


def _try_installed(root: Optional[Path]):
    try:
        spec = importlib.util.find_spec(INSTALLED_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return None
    sidecar = Path(spec.origin).with_name("_C.json")
    manifest = {}
    if sidecar.is_file():
        try:
            manifest = json.loads(sidecar.read_text())
        except ValueError:
            manifest = {}
    if manifest.get("torch") not in (None, torch.__version__):
        _notes.append(f"ignored {spec.origin}: built for torch {manifest.get('torch')}")
        return None
    if _stale(root, manifest):
        _notes.append(f"ignored {spec.origin}: the sources changed since it was built")
        return None
    try:
        mod = importlib.import_module(INSTALLED_MODULE)
    except Exception as exc:
        _notes.append(f"ignored {spec.origin}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    info = json.loads(torch.ops.fastadv_ext.build_info())
    if info.get("torch_version") != _torch_base_version():
        # Loaded, so its ops are registered: keep it, but say that it is suspect.
        _notes.append(f"{spec.origin} was compiled against torch {info.get('torch_version')}, "
                      f"this is {torch.__version__}; rebuild it")
    _origin.update(kind="installed", path=str(spec.origin), manifest=manifest)
    return mod


def _first_error_line(text: str) -> str:
    """The line of a build log that says what went wrong, shortened."""
    m = re.search(r"([^\s:]+):(\d+):(?:\d+:)? (?:fatal )?error: ?(.*)", text)
    if m:
        return f"{Path(m.group(1)).name}:{m.group(2)}: error: {m.group(3).strip()}"[:300]
    for pat in (r"error:.*", r"Error.*", r"\S.*"):
        m = re.search(pat, text)
        if m:
            return m.group(0).strip()[:300]
    return "unknown error"


def _variant(root: Path, cuda: bool, archs: str) -> Dict[str, object]:
    return {
        "torch": torch.__version__, "python": python_tag(), "cuda": cuda,
        "archs": archs if cuda else "", "sources_hash": sources_hash(root, cuda),
        "flags": compile_flags(cuda), "platform": platform.machine(), "toolchain": toolchain(cuda),
    }


def _compile(name: str, root: Path, build_dir: Path, cuda: bool, archs: str, verbose: bool,
             announce: Optional[str]):
    """torch.utils.cpp_extension.load into build_dir; BuildError (one line) on failure."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    flags = compile_flags(cuda)
    sources = [str(root / s) for s in read_sources(root, cuda)]
    if announce:
        print(announce, file=sys.stderr, flush=True)
    old_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    log = build_dir / "build.log"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = cpp_extension.load(
                name=name, sources=sources, extra_cflags=flags["cflags"],
                extra_cuda_cflags=flags["cuda_cflags"], extra_ldflags=flags["ldflags"],
                build_directory=str(build_dir), verbose=verbose, with_cuda=cuda)
        log.write_text("".join(f"warning: {w.message}\n" for w in caught))
    except Exception as exc:  # compiler errors, missing ninja, a bad toolchain, ...
        text = f"{type(exc).__name__}: {exc}"
        try:
            log.write_text(text)
            where = f"; full log: {log}"
        except OSError:
            where = ""
        (build_dir / _OK_FILE).unlink(missing_ok=True)
        raise BuildError(f"{_first_error_line(str(exc) or type(exc).__name__)}{where}") from None
    finally:
        if cuda:
            if old_archs is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_archs
    return mod


def variant_key(variant: Dict[str, object]) -> str:
    """The JIT cache directory's key: everything the build depends on, toolchain included."""
    return hashlib.sha256(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:12]


def _jit_variant(root: Path, cuda: bool, archs: str, cuda_skip: Optional[str]):
    variant = _variant(root, cuda, archs)
    key = variant_key(variant)
    build_dir = cache_root() / f"{torch.__version__}-{key}"
    name = "fastadv_ext_cuda" if cuda else "fastadv_ext_cpu"
    so = build_dir / (f"{name}.pyd" if os.name == "nt" else f"{name}.so")
    ok = build_dir / _OK_FILE
    if ok.is_file() and so.is_file():
        try:
            mod = _import_path(name, so)
            _origin.update(kind="jit", path=str(so), manifest=json.loads(ok.read_text()))
            return mod
        except Exception as exc:  # a broken cache entry: build again
            _notes.append(f"rebuilt {so}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            ok.unlink(missing_ok=True)
    what = "CUDA + cpp" if cuda else "cpp"
    mod = _compile(name, root, build_dir, cuda, archs, verbose=False,
                   announce=f"fastadv: compiling the {what} extension (once, cached in {build_dir})")
    manifest = dict(variant, library=so.name, kind="jit")
    if cuda_skip:
        manifest["cuda_skip_reason"] = cuda_skip
    ok.write_text(json.dumps(manifest, indent=1))
    _origin.update(kind="jit", path=str(so), manifest=manifest)
    return mod


def _jit(root: Path):
    skip = cuda_skip_reason()
    if skip is not None:
        return _jit_variant(root, False, "", skip)
    archs = normalize_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or visible_arch_list())
    try:
        return _jit_variant(root, True, archs, None)
    except BuildError as exc:
        # Keep the CPU kernels usable: build them alone (the cuda backend reports why not).
        print(f"fastadv: the CUDA build failed ({exc}); building the cpp extension without CUDA",
              file=sys.stderr, flush=True)
        return _jit_variant(root, False, "", f"the CUDA build failed: {exc}")


def load():
    """The extension module (compiling it the first time); BuildError says why not."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise BuildError(_error)
        try:
            if os.environ.get("FASTADV_NO_EXT") == "1":
                raise BuildError("disabled by FASTADV_NO_EXT=1")
            if _already_registered():
                # e.g. the CMake library, loaded with torch.ops.load_library: use it as it is
                _module = torch.ops.fastadv_ext
                _origin.update(kind="preloaded", path=None, manifest={})
                return _module
            try:
                root: Optional[Path] = source_root()
            except BuildError as exc:
                root, missing = None, str(exc)
            mod = _try_aot(root) or _try_installed(root)
            if mod is None:
                if root is None:
                    raise BuildError(missing)
                mod = _jit(root)
        except BuildError as exc:
            _error = str(exc)
            if os.environ.get("FASTADV_NO_EXT") != "1":
                print(f"fastadv: the native extension is unavailable ({_error}); using the torch backend",
                      file=sys.stderr, flush=True)
            raise
        except Exception as exc:  # never let a loader bug break `import fastadv` users
            _error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"fastadv: the native extension is unavailable ({_error}); using the torch backend",
                  file=sys.stderr, flush=True)
            raise BuildError(_error) from None
        _module = mod
        return mod


def status() -> Union[bool, str]:
    """True once the extension is loaded (building it if needed), else one line why not."""
    try:
        load()
    except BuildError as exc:
        return str(exc)
    return True


def is_loaded() -> bool:
    return _module is not None


def build_info() -> Dict[str, object]:
    """What the loaded extension holds and where it came from (loads it if needed)."""
    try:
        load()
    except BuildError as exc:
        return {"loaded": False, "error": str(exc), "notes": list(_notes)}
    info = json.loads(torch.ops.fastadv_ext.build_info())
    manifest = _origin.get("manifest") or {}
    info.update(loaded=True, kind=_origin.get("kind"), path=_origin.get("path"),
                arch_request=manifest.get("archs", ""), notes=list(_notes))
    if not info.get("cuda"):
        info["cuda_skip_reason"] = (_origin.get("manifest") or {}).get("cuda_skip_reason") or cuda_skip_reason()
    return info


# ------------------------------------------------------------- ahead of time
def build(arch_list: Optional[str] = None, verbose: bool = False, cpu_only: bool = False) -> Path:
    """Compile the extension for ``arch_list`` (e.g. "9.0" or "8.0;9.0+PTX") into the
    AOT directory that ``load()`` tries first; returns the library's path.

    CUDA is included unless ``cpu_only`` or this torch/toolkit cannot build it (then
    a line says so and the build is CPU-only). Without ``arch_list``:
    ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs.
    """
    root = source_root()
    cuda, why_not = not cpu_only, None
    if cuda and torch.version.cuda is None:
        cuda, why_not = False, f"this torch ({torch.__version__}) has no CUDA"
    elif cuda and cuda_toolkit() is None:
        cuda, why_not = False, "no CUDA toolkit found (set CUDA_HOME to one with bin/nvcc)"
    elif cuda and cuda_version_mismatch():
        cuda, why_not = False, cuda_version_mismatch()
    archs = ""
    if cuda:
        wanted = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or (
            visible_arch_list() if torch.cuda.is_available() else "")
        if not wanted:
            raise BuildError("no GPU visible to choose CUDA archs: name them, e.g. `fastadv build --arch 9.0`")
        archs = normalize_arch_list(wanted)
    if why_not:
        ignored = f" (--arch {arch_list} ignored)" if arch_list else ""
        print(f"fastadv build: {why_not}; building the CPU (cpp) extension only{ignored}", file=sys.stderr)
    if is_loaded() or "fastadv_ext" in _registered_namespaces():
        # This process already holds an extension (one per process): build in a fresh one.
        cmd = [sys.executable, "-m", "fastadv", "build"]
        cmd += ["--arch", archs] if archs else ["--cpu"]
        cmd += ["--verbose"] if verbose else []
        subprocess.run(cmd, check=True)
        return aot_dir() / json.loads((aot_dir() / _OK_FILE).read_text())["library"]
    d = aot_dir()
    (d / _OK_FILE).unlink(missing_ok=True)
    what = f"CUDA ({archs}) + cpp" if cuda else "cpp"
    mod = _compile(AOT_NAME, root, d, cuda, archs, verbose=verbose,
                   announce=f"fastadv build: compiling the {what} extension into {d}")
    so = Path(mod.__file__)
    manifest = dict(_variant(root, cuda, archs), library=so.name, kind="aot")
    if why_not:
        manifest["cuda_skip_reason"] = why_not
    (d / _OK_FILE).write_text(json.dumps(manifest, indent=1))
    global _module
    with _lock:
        _module = mod
        _origin.update(kind="aot", path=str(so), manifest=manifest)
    return so


def _already_registered() -> bool:
    """Whether some library in this process already defines the fastadv_ext ops."""
    try:
        torch.ops.fastadv_ext.build_info
    except (AttributeError, RuntimeError):
        return False
    return True


def _registered_namespaces() -> set:
    try:
        return {str(op).split("::")[0] for op in torch._C._dispatch_get_all_op_names()}
    except Exception:
        return set()
