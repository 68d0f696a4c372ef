"""The cpp (and, on a GPU, cuda) backends against fastadv.ops.reference, the
fastadv_ext ops' checks and opcheck, and the build/loader paths (JIT cache, a
broken build falling back to torch, source discovery of a non-editable install).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastadv import _build, ops
from fastadv.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STEP_OPS = ("linf_step", "l2_step")
PROJECT_OPS = ("linf_project", "l2_project")

CPP = ops.backends()["cpp"]
needs_cpp = pytest.mark.skipif(CPP is not True, reason=f"cpp backend: {CPP}")


# ------------------------------------------------------------------ helpers
def _inputs(shape, dtype, grad_dtype=None, seed=0, layout="contiguous", device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g)
    x_adv = (x_nat + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    x_nat, x_adv = x_nat.to(device, dtype), x_adv.to(device, dtype)
    grad = grad.to(device, grad_dtype or dtype)
    if layout == "channels_last":
        x_nat, x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_nat, x_adv, grad))
    elif layout == "strided":
        x_nat, x_adv, grad = (_strided(t) for t in (x_nat, x_adv, grad))
    return x_adv, x_nat, grad


def _strided(t):
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |v| (v in float32)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.abs())
    spacing = torch.ldexp(torch.full_like(v, fi.eps), (e - 1).to(torch.float32))
    return spacing.clamp_min(fi.smallest_normal * fi.eps)


def assert_matches(out, expect, dtype, value_range=1.0):
    """fp32: max abs error <= 1e-6 x value range; fp16/bf16: at most one ulp of the dtype."""
    assert out.dtype == expect.dtype and out.shape == expect.shape
    o, r = out.float().cpu(), expect.float().cpu()
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(o), nan), "NaN positions differ"
    o, r = o[~nan], r[~nan]
    if o.numel() == 0:
        return
    err = (o - r).abs()
    if dtype == torch.float32:
        assert err.max().item() <= 1e-6 * value_range, f"max error {err.max().item():.3g}"
    else:
        bad = err > _ulp(r, dtype)
        assert not bool(bad.any()), f"{int(bad.sum())} entries off by more than one ulp (max {err.max():.3g})"


def _call(name, backend, x_adv, x_nat, grad, alpha, eps, lower=0.0, upper=1.0):
    fn = getattr(ops, name)
    if name in STEP_OPS:
        return fn(x_adv, x_nat, grad, alpha, eps, lower, upper, backend=backend)
    return fn(x_adv, x_nat, eps, lower, upper, backend=backend)


def _reference(name, x_adv, x_nat, grad, alpha, eps, lower=0.0, upper=1.0):
    fn = getattr(ref, name)
    if name in STEP_OPS:
        return fn(x_adv, x_nat, grad, alpha, eps, lower, upper)
    return fn(x_adv, x_nat, eps, lower, upper)


def _params(name):
    # L2 radii large enough that some samples hit the ball's boundary and some not.
    return (2 / 255, 8 / 255) if name.startswith("linf") else (0.3, 0.9)


ALL_OPS = STEP_OPS + PROJECT_OPS

# batch 1, odd sizes that are no multiple of any vector/chunk width, tiny samples,
# samples of one element, and a 3x224x224 batch (the tiled L2 path on CPU).
SHAPES = [(1, 3, 5, 7), (7, 3, 17, 13), (2, 100003), (33, 7), (4, 1), (1, 1),
          (5, 3, 32, 32), (2, 3, 224, 224)]


# ------------------------------------------------------------ correctness
@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_matches_reference_fp32(name, shape):
    x_adv, x_nat, grad = _inputs(shape, torch.float32)
    alpha, eps = _params(name)
    out = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
    expect = _reference(name, x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, expect, torch.float32)
    if name == "linf_step":  # identical sign decisions
        assert torch.equal(torch.sign(out - x_adv), torch.sign(expect - x_adv))


@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_cpp_dtype_combinations(name, dtype, grad_dtype):
    if name in PROJECT_OPS and grad_dtype != dtype:
        pytest.skip("projections take no gradient")
    x_adv, x_nat, grad = _inputs((3, 3, 19, 21), dtype, grad_dtype, seed=1)
    alpha, eps = _params(name)
    out = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps), dtype)


@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_big_batch(name, dtype):
    x_adv, x_nat, grad = _inputs((2, 3, 224, 224), dtype, seed=2)
    alpha, eps = _params(name)
    out = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps), dtype)


@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_layouts(name, layout, dtype):
    x_adv, x_nat, grad = _inputs((3, 4, 9, 11), dtype, torch.float32, seed=3, layout=layout)
    alpha, eps = _params(name)
    out = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps), dtype)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("shape", [(6, 3, 8, 8), (6, 5), (1, 3, 224, 224)])
def test_cpp_per_sample_alpha_eps(name, shape):
    x_adv, x_nat, grad = _inputs(shape, torch.float32, seed=4)
    b = shape[0]
    g = torch.Generator().manual_seed(5)
    alpha = torch.rand(b, generator=g) * 0.05
    eps = torch.rand(b, generator=g) * (0.05 if name.startswith("linf") else 2.0)
    eps[0] = 0.0  # a zero radius pins the sample to x_nat
    for a, e in ((alpha, eps), (0.01, eps), (alpha, 0.04)):
        out = _call(name, "cpp", x_adv, x_nat, grad, a, e)
        assert_matches(out, _reference(name, x_adv, x_nat, grad, a, e), torch.float32)


@needs_cpp
@pytest.mark.parametrize("name", STEP_OPS)
def test_cpp_non_finite_gradients(name):
    x_adv, x_nat, grad = _inputs((4, 3, 7, 7), torch.float32, seed=6)
    grad.view(-1)[::5] = float("nan")
    grad.view(-1)[1::11] = float("inf")
    grad.view(-1)[2::13] = float("-inf")
    grad[1] = 0.0  # a sample with no gradient at all
    grad[2] = float("nan")  # and one with nothing but NaN
    alpha, eps = _params(name)
    out = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps), torch.float32)
    if name == "linf_step":  # a NaN entry moves nothing: only the projection acts on it
        nan = torch.isnan(grad)
        assert torch.equal(out[nan], ref.linf_project(x_adv, x_nat, eps)[nan])


@needs_cpp
@pytest.mark.parametrize("where", ["x_adv", "x_nat"])
def test_cpp_nan_in_inputs_propagates_like_the_reference(where):
    x_adv, x_nat, grad = _inputs((2, 50), torch.float32, seed=7)
    (x_adv if where == "x_adv" else x_nat)[0, 3] = float("nan")
    (x_adv if where == "x_adv" else x_nat)[1, 7] = float("inf")
    for name in ALL_OPS:
        alpha, eps = _params(name)
        out = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
        expect = _reference(name, x_adv, x_nat, grad, alpha, eps)
        assert bool(torch.isnan(expect).any()), name  # the case is not vacuous
        assert_matches(out, expect, torch.float32)


@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_inplace_and_aliasing(name, dtype):
    x_adv, x_nat, grad = _inputs((3, 3, 10, 10), dtype, seed=8)
    alpha, eps = _params(name)
    expect = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
    target = x_adv.clone()
    fn = getattr(ops, name + "_")
    args = (target, x_nat, grad, alpha, eps) if name in STEP_OPS else (target, x_nat, eps)
    assert fn(*args, backend="cpp") is target
    assert torch.equal(target, expect)
    # out, x_adv and x_nat all one tensor (random_init does this for the projection)
    same = x_adv.clone()
    args = (same, same, grad, alpha, eps) if name in STEP_OPS else (same, same, eps)
    fn(*args, backend="cpp")
    assert_matches(same, _reference(name, x_adv, x_adv, grad, alpha, eps), dtype)


@needs_cpp
def test_cpp_infinite_eps_and_bounds_as_in_random_init():
    x = torch.rand(3, 3, 9, 9) * 3 - 1
    out = x.clone()
    torch.ops.fastadv.linf_project_(out, out, None, float("inf"), -0.5, 0.5, "cpp")
    assert torch.equal(out, x.clamp(-0.5, 0.5))
    gen = torch.Generator().manual_seed(0)
    r = ops.random_init(torch.rand(2, 3, 8, 8), 0.1, "l2", generator=gen, backend="cpp")
    assert r.min() >= 0 and r.max() <= 1


@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
def test_cpp_both_instruction_set_variants_agree(name):
    info = _build.build_info()
    variants = info["cpu_isas"].split(",")
    x_adv, x_nat, grad = _inputs((3, 3, 33, 17), torch.float16, torch.bfloat16, seed=9)
    alpha, eps = _params(name)
    results = []
    try:
        for v in variants:
            try:
                torch.ops.fastadv_ext.cpu_isa(v)
            except RuntimeError:
                continue  # compiled in, but this CPU lacks it
            results.append(_call(name, "cpp", x_adv, x_nat, grad, alpha, eps))
    finally:
        torch.ops.fastadv_ext.cpu_isa("")
    assert results
    for r in results[1:]:
        assert torch.equal(r, results[0])


@needs_cpp
@pytest.mark.parametrize("name", ALL_OPS)
def test_cpp_results_do_not_depend_on_thread_count(name):
    x_adv, x_nat, grad = _inputs((2, 3, 224, 224), torch.float32, seed=10)
    alpha, eps = _params(name)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
        torch.set_num_threads(2)
        two = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_cpp
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), n=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       name=st.sampled_from(ALL_OPS), seed=st.integers(0, 2**16),
       lower=st.sampled_from([0.0, -1.0]), per_sample=st.booleans())
def test_cpp_property_random_shapes(b, n, dtype, name, seed, lower, per_sample):
    x_adv, x_nat, grad = _inputs((b, n), dtype, seed=seed)
    alpha, eps = _params(name)
    if per_sample:
        eps = torch.full((b,), eps) * torch.linspace(0.0, 1.5, b)
    out = _call(name, "cpp", x_adv, x_nat, grad, alpha, eps, lower, 1.0)
    assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps, lower, 1.0), dtype,
                   value_range=1.0 - lower)


# ------------------------------------------------------- fastadv_ext layer
def _ext_step_args(shape=(2, 3, 4, 4), dtype=torch.float32):
    x_adv, x_nat, grad = _inputs(shape, dtype)
    return torch.empty_like(x_adv), x_adv, x_nat, grad


@needs_cpp
def test_ext_checks_name_the_argument():
    E = torch.ops.fastadv_ext
    out, x_adv, x_nat, grad = _ext_step_args()
    bad = [
        (lambda: E.linf_step(out, x_adv, x_nat[:, :, :3], grad, None, 0.1, None, 0.1, 0.0, 1.0), "x_nat"),
        (lambda: E.linf_step(out, x_adv.half(), x_nat, grad, None, 0.1, None, 0.1, 0.0, 1.0), "x_adv"),
        (lambda: E.linf_step(out, x_adv, x_nat, grad.double(), None, 0.1, None, 0.1, 0.0, 1.0), "grad"),
        (lambda: E.linf_step(out, x_adv, x_nat, grad, torch.ones(3), 0.1, None, 0.1, 0.0, 1.0), "alpha_t"),
        (lambda: E.l2_step(out, x_adv, x_nat, grad, None, 0.1, torch.ones(2).double(), 0.1, 0.0, 1.0), "eps_t"),
        (lambda: E.linf_step(out, x_adv, x_nat, grad, None, 0.1, None, 0.1, 1.0, 0.0), "lower"),
        (lambda: E.linf_step(out, x_adv, x_nat, grad, None, 0.1, None, 0.1, float("nan"), 1.0), "lower"),
        (lambda: E.linf_step(out, x_adv.contiguous(memory_format=torch.channels_last), x_nat, grad,
                             None, 0.1, None, 0.1, 0.0, 1.0), "strides"),
        (lambda: E.linf_project(out[:, :, ::2], x_adv[:, :, ::2], x_nat[:, :, ::2], None, 0.1, 0.0, 1.0),
         "dense"),
        (lambda: E.linf_project(out.transpose(0, 1), x_adv.transpose(0, 1), x_nat.transpose(0, 1),
                                None, 0.1, 0.0, 1.0), "outermost"),
        (lambda: E.l2_project(out.long(), x_adv, x_nat, None, 0.1, 0.0, 1.0), "out"),
        (lambda: E.l2_project(out, x_adv, x_nat.half(), None, 0.1, 0.0, 1.0), "x_nat"),
    ]
    for fn, word in bad:
        with pytest.raises(RuntimeError, match=word):
            fn()
    # partial overlap of out with an input is refused
    buf = torch.rand(33)
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        E.linf_project(buf[1:].view(1, 32), buf[:32].view(1, 32), torch.rand(1, 32), None, 0.1, 0.0, 1.0)


@needs_cpp
def test_ext_empty_and_zero_size():
    E = torch.ops.fastadv_ext
    for shape in ((0, 3), (3, 0), (0,)):
        t = torch.empty(shape)
        E.linf_step(t, t, t, t, None, 0.1, None, 0.1, 0.0, 1.0)
        E.l2_project(t, t, t, None, 0.1, 0.0, 1.0)


@needs_cpp
@pytest.mark.parametrize("per_sample", [False, True])
def test_ext_opcheck(per_sample):
    out, x_adv, x_nat, grad = _ext_step_args((2, 3, 5, 5))
    t = torch.tensor([0.05, 0.2]) if per_sample else None
    E = torch.ops.fastadv_ext
    cases = [
        (E.linf_step.default, (out, x_adv, x_nat, grad, t, 0.02, t, 0.1, 0.0, 1.0)),
        (E.l2_step.default, (out.clone(), x_adv, x_nat, grad.half(), t, 0.2, None, 0.3, 0.0, 1.0)),
        (E.linf_project.default, (out.clone(), x_adv, x_nat, t, 0.1, 0.0, 1.0)),
        (E.l2_project.default, (out.clone(), x_adv, x_nat, t, 0.1, -1.0, 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_cpp
def test_build_info_reports_the_build():
    info = _build.build_info()
    assert info["loaded"] is True
    assert info["kind"] in ("jit", "aot", "installed")
    assert Path(info["path"]).is_file()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert "baseline" in info["cpu_isas"].split(",")
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list) and "cuda_version" in info
    assert bool(info["cuda_archs"]) == info["cuda"]
    if not info["cuda"]:
        assert info["cuda_skip_reason"]
    mod = _build.load()
    if hasattr(mod, "build_info"):  # the pybind11 face (absent in a CMake library)
        assert mod.build_info()["torch_version"] == info["torch_version"]


def test_cuda_backend_not_ready_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    st_ = ops.backends()["cuda"]
    assert st_ is not True and "no CUDA device" in st_
    from fastadv.ops import _native
    assert _native.cuda_backend.supports(torch.device("cpu")) is not True
    assert _native.cpp_backend.supports(torch.device("cpu")) is True


# ------------------------------------------------------------ the loaders
def _run_py(code, env_extra=None, timeout=600, cwd=ROOT):
    env = dict(os.environ)
    env.update(env_extra or {})
    env.setdefault("PYTHONPATH", str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=str(cwd), timeout=timeout)


FALLBACK_SCRIPT = """
    import warnings, torch
    from fastadv import ops
    from fastadv.ops import reference as ref
    x = torch.rand(2, 3, 4, 4); g = torch.randn_like(x)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = ops.linf_step(x, x, g, 0.1, 0.1, backend="cpp")
    assert torch.equal(out, ref.linf_step(x, x, g, 0.1, 0.1))
    print("WARNINGS", len(w), str(w[0].message) if w else "")
    print("CPP", ops.backends()["cpp"])
"""


def test_broken_build_prints_one_line_and_falls_back(tmp_path):
    src = tmp_path / "src"
    (src / "csrc").mkdir(parents=True)
    (src / "csrc" / "sources.txt").write_text("csrc/broken.cpp cpu\n")
    (src / "csrc" / "broken.cpp").write_text("this is not C++ at all;\n")
    r = _run_py(FALLBACK_SCRIPT, {"FASTADV_SOURCE_DIR": str(src), "FASTADV_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    # one line to say it compiles, one line to say why it failed; no compiler spew
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("fastadv: compiling the cpp extension")
    assert lines[1].startswith("fastadv: the native extension is unavailable (")
    assert "broken.cpp" in lines[1] and "error" in lines[1]
    assert "WARNINGS 1" in r.stdout and "not available" in r.stdout
    assert "CPP broken.cpp" in r.stdout


def test_missing_sources_fall_back(tmp_path):
    r = _run_py(FALLBACK_SCRIPT, {"FASTADV_SOURCE_DIR": str(tmp_path), "FASTADV_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sources.txt" in lines[0], r.stderr


def test_disabled_extension_is_silent():
    r = _run_py(FALLBACK_SCRIPT, {"FASTADV_NO_EXT": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""
    assert "CPP disabled by FASTADV_NO_EXT=1" in r.stdout


@needs_cpp
def test_jit_cache_is_reused_without_compiling():
    # this test session already built (or found) the extension: a new process must not compile
    r = _run_py("""
        from fastadv import _build
        print(_build.status(), _build.build_info()["kind"])
    """)
    assert r.returncode == 0, r.stderr
    assert "compiling" not in r.stderr
    assert r.stdout.split()[0] == "True"


# ------------------------------------------------------------ the build files
def test_source_list_resolves_in_checkout_and_installed_layouts(tmp_path):
    # checkout layout
    for cuda in (False, True):
        for rel in _build.read_sources(ROOT, cuda):
            assert (ROOT / rel).is_file(), rel
    assert _build.source_root() in (ROOT, ROOT / "fastadv")
    # the layout of `pip install .`: setup.py's build_py copies the sources into the package
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, r.stderr
    pkg = tmp_path / "lib" / "fastadv"
    assert (pkg / "csrc" / "sources.txt").is_file()
    for cuda in (False, True):
        for rel in _build.read_sources(pkg, cuda):
            assert (pkg / rel).is_file(), rel
    for header in ("csrc/cpu_kernels.h", "csrc/cpu_kernels_impl.h", "csrc/op_checks.h",
                   "csrc/build_info.h", "kernels/fastadv_kernels.cuh"):
        assert (pkg / header).is_file(), header
    # an installed package hashes exactly like the checkout (the loader compares them)
    for cuda in (False, True):
        assert _build.sources_hash(pkg, cuda) == _build.sources_hash(ROOT, cuda)
    assert _build.sources_hash(ROOT, False) != _build.sources_hash(ROOT, True)
    # and the loader finds them from the installed package's own location
    r = _run_py("import fastadv._build as b; print(b.source_root())", {"PYTHONPATH": str(tmp_path / "lib")},
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == pkg


def test_setup_py_is_pure_python_by_default():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, runpy, setuptools
        captured = {}
        setuptools.setup = lambda **kw: captured.update(kw)
        sys.argv = ["setup.py", "--version"]
        runpy.run_path("setup.py", run_name="__main__")
        print("EXT", len(captured.get("ext_modules", [])))
        print("TORCH", "torch" in sys.modules)
    """)], capture_output=True, text=True, cwd=str(ROOT), env={**os.environ, "FASTADV_BUILD_EXT": "0"},
        timeout=120)
    assert r.returncode == 0, r.stderr
    assert "EXT 0" in r.stdout and "TORCH False" in r.stdout
    assert "pure-Python build" in r.stderr


def test_cmake_reads_the_same_source_list():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "csrc/sources.txt" in text
    setup_text = (ROOT / "setup.py").read_text()
    assert "read_sources" in setup_text


def test_normalize_arch_list():
    assert _build.normalize_arch_list("9.0") == "9.0"
    assert _build.normalize_arch_list("8.0 9.0+PTX") == "8.0;9.0+PTX"
    assert _build.normalize_arch_list("sm_90,80") == "9.0;8.0"
    assert _build.normalize_arch_list("9.0a") == "9.0a"
    with pytest.raises(_build.BuildError):
        _build.normalize_arch_list("hopper")


@pytest.mark.slow
def test_aot_build_is_found_first(tmp_path):
    """`fastadv build` into a fresh cache; a new process then loads that build, not a JIT one."""
    env = {"FASTADV_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "fastadv", "build", "--cpu"], capture_output=True, text=True,
                       cwd=str(ROOT), env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "fastadv build: built" in r.stdout
    r = _run_py("""
        import json
        from fastadv import _build
        print(json.dumps(_build.build_info()))
    """, env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "aot" and "compiling" not in r.stderr


# ------------------------------------------------------------------- GPU
def _cuda_ready():
    st_ = ops.backends()["cuda"]
    assert st_ is True, f"cuda backend not ready on a GPU machine: {st_}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("shape", SHAPES + [(1, 3, 224, 224), (300, 3, 32, 32)])
def test_cuda_matches_reference_fp32(name, shape):
    _cuda_ready()
    x_adv, x_nat, grad = _inputs(shape, torch.float32, device="cuda")
    alpha, eps = _params(name)
    out = _call(name, "cuda", x_adv, x_nat, grad, alpha, eps)
    expect = _reference(name, x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, expect, torch.float32)
    if name == "linf_step":
        assert torch.equal(torch.sign(out - x_adv), torch.sign(expect - x_adv))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3, 19, 21), (2, 3, 224, 224)])
def test_cuda_dtype_combinations(name, dtype, grad_dtype, shape):
    _cuda_ready()
    if name in PROJECT_OPS and grad_dtype != dtype:
        pytest.skip("projections take no gradient")
    x_adv, x_nat, grad = _inputs(shape, dtype, grad_dtype, seed=1, device="cuda")
    alpha, eps = _params(name)
    out = _call(name, "cuda", x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_cuda_layouts_per_sample_nan_inplace(name, layout):
    _cuda_ready()
    x_adv, x_nat, grad = _inputs((6, 3, 9, 11), torch.float32, seed=3, layout=layout, device="cuda")
    grad[..., ::3] = float("nan")  # indexing works for every layout (view(-1) does not)
    b = x_adv.shape[0]
    alpha = torch.rand(b, device="cuda") * 0.05
    eps = torch.rand(b, device="cuda") * (0.05 if name.startswith("linf") else 2.0)
    out = _call(name, "cuda", x_adv, x_nat, grad, alpha, eps)
    assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps), torch.float32)
    target = x_adv.clone()
    fn = getattr(ops, name + "_")
    fn(*((target, x_nat, grad, alpha, eps) if name in STEP_OPS else (target, x_nat, eps)), backend="cuda")
    assert torch.equal(target, out)


@pytest.mark.gpu
def test_cuda_unaligned_and_misaligned_storage():
    _cuda_ready()
    base = torch.rand(1 + 4 * 3 * 8 * 8, device="cuda")
    x_adv = base[1:].view(4, 3, 8, 8)  # 4-byte offset: no 16-byte accesses
    x_nat = torch.rand_like(x_adv)
    grad = torch.randn_like(x_adv)
    for name in ALL_OPS:
        alpha, eps = _params(name)
        out = _call(name, "cuda", x_adv, x_nat, grad, alpha, eps)
        assert_matches(out, _reference(name, x_adv, x_nat, grad, alpha, eps), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_opcheck_and_graph_capture(per_sample):
    _cuda_ready()
    out, x_adv, x_nat, grad = (t.cuda() for t in _ext_step_args((2, 3, 5, 5)))
    t = torch.tensor([0.05, 0.2], device="cuda") if per_sample else None
    E = torch.ops.fastadv_ext
    for op, args in [
        (E.linf_step.default, (out, x_adv, x_nat, grad, t, 0.02, t, 0.1, 0.0, 1.0)),
        (E.l2_step.default, (out.clone(), x_adv, x_nat, grad, t, 0.2, None, 0.3, 0.0, 1.0)),
        (E.linf_project.default, (out.clone(), x_adv, x_nat, t, 0.1, 0.0, 1.0)),
        (E.l2_project.default, (out.clone(), x_adv, x_nat, t, 0.1, 0.0, 1.0)),
    ]:
        torch.library.opcheck(op, args)
    # the in-place step inside a captured CUDA graph, including the split L2 path
    xa, xn, g = _inputs((1, 3, 224, 224), torch.float32, device="cuda")
    work = xa.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.l2_step_(work, xn, g, 0.1, 0.5, backend="cuda", _check_values=False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    work.copy_(xa)
    with torch.cuda.graph(graph):
        ops.l2_step_(work, xn, g, 0.1, 0.5, backend="cuda", _check_values=False)
        ops.linf_step_(work, xn, g, 0.01, 0.5, backend="cuda", _check_values=False)
    work.copy_(xa)
    graph.replay()
    expect = ref.linf_step(ref.l2_step(xa, xn, g, 0.1, 0.5), xn, g, 0.01, 0.5)
    assert_matches(work, expect, torch.float32)
