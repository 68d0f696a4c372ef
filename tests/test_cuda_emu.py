"""The unmodified kernels/*.cu run on the CPU through tests/cuda_emu, against fastadv.ops.reference.

Every C launcher (linf/l2 step and project) runs on the cases the ops tests use:
fused and split L2 schedules, aligned and misaligned pointers, vector tails,
per-sample alpha/eps, out aliasing x, NaN gradients, fp32/fp16/bf16, B=1 and odd
sizes. The same cases run again under AddressSanitizer+UBSan and ThreadSanitizer,
and planted bugs in copies of the kernels show that the harness catches them.
Needs g++ and a CUDA toolkit's headers (for the fp16/bf16 conversions), not a GPU.
"""
import re
import shutil

import pytest
import torch

from cuda_emu import harness as H

try:
    H.cuda_include()
    H.compiler()
    _UNAVAILABLE = None
except H.EmuUnavailable as exc:
    _UNAVAILABLE = str(exc)

pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"cuda_emu: {_UNAVAILABLE}")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
SHAPES = [(1, 3, 5, 7), (3, 1, 28, 28), (5, 3, 17, 13), (2, 1000), (4, 3, 32, 32), (2, 1001)]
ERR_INVALID_VALUE = 1  # cudaErrorInvalidValue


def _inputs(shape, dtype, seed, grad_dtype=None, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g).to(dtype)
    x = (x_nat.float() + spread * torch.randn(shape, generator=g)).clamp(-1, 2).to(dtype)
    grad = torch.randn(shape, generator=g)
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    return x, x_nat, grad.to(grad_dtype or dtype)


def _case(op, shape, dtype, seed, alpha=None, eps=None, grad_dtype=None, spread=None, **kw):
    linf = op.startswith("linf")
    if spread is None:  # projections start outside the ball, so that it binds
        spread = 0.05 if op.endswith("step") else (0.2 if linf else 0.5)
    x, x_nat, grad = _inputs(shape, dtype, seed, grad_dtype, spread)
    if alpha is None:
        alpha = 2 / 255 if linf else 0.2
    if eps is None:
        eps = 8 / 255 if linf else 0.5
    return H.Case(op, x, x_nat, grad if op.endswith("step") else None, alpha, eps, **kw)


def _build_cases():
    cases = {}
    ops = ["linf_step", "linf_project", "l2_step", "l2_project"]
    seed = 0

    def add(name, case):
        nonlocal seed
        assert name not in cases
        cases[name] = case
        seed += 1

    # The ops tests' shapes and dtypes (tails: 105, 1001 and 663-element samples).
    for op in ops:
        for shape in SHAPES:
            for dt in DTYPES:
                add(f"{op}-{'x'.join(map(str, shape))}-{dt}", _case(op, shape, dt, seed))
    # Gradient dtype unlike x's.
    for op in ("linf_step", "l2_step"):
        for xd, gd in ((F32, F16), (F32, BF16), (BF16, F32), (F16, BF16)):
            add(f"{op}-grad-{xd}-{gd}", _case(op, (3, 3, 9, 11), xd, seed, grad_dtype=gd))
    # Per-sample alpha/eps: zeros, a binding and a loose ball; tiny samples share a vector.
    alpha = torch.tensor([0.0, 0.01, 0.05, 0.3])
    eps = torch.tensor([0.0, 0.02, 0.04, 1.0])
    for op in ops:
        for dt in (F32, F16):
            add(f"{op}-per-sample-{dt}", _case(op, (4, 2, 6, 6), dt, seed, alpha=alpha, eps=eps))
    for op in ("linf_step", "linf_project", "l2_step"):
        for shape, dt in (((5, 3), F32), ((3, 7), F32), ((4, 5), F16), ((3, 13), F16), ((6, 2), BF16)):
            b = shape[0]
            a = torch.linspace(0.0, 0.2, b)
            e = torch.linspace(0.01, 0.3, b).flip(0)
            add(f"{op}-per-sample-{'x'.join(map(str, shape))}-{dt}", _case(op, shape, dt, seed, alpha=a, eps=e))
    # One misaligned pointer at a time: the launchers must take the scalar path.
    for op in ("linf_step", "l2_step", "linf_project", "l2_project"):
        for which in range(4 if op.endswith("step") else 3):
            for dt in (F32, F16):
                off = [0, 0, 0, 0]
                off[which] = 1
                add(f"{op}-misaligned-{'out x x_nat grad'.split()[which]}-{dt}",
                    _case(op, (3, 3, 8, 8), dt, seed, offsets=tuple(off)))
    # In place: out is x.
    for op in ops:
        for dt in (F32, BF16):
            add(f"{op}-in-place-{dt}", _case(op, (3, 3, 9, 9), dt, seed, in_place=True))
    # NaN and inf gradients, NaN in x_nat, a zero-gradient sample.
    for op in ("linf_step", "l2_step"):
        for dt in (F32, BF16):
            c = _case(op, (3, 3, 6, 6), dt, seed)
            c.grad.view(-1)[::7] = float("nan")
            c.grad.view(-1)[3::11] = float("inf")
            c.grad[2] = 0.0
            c.x_nat.view(-1)[5] = float("nan")
            add(f"{op}-nonfinite-{dt}", c)
    # L2 split over several blocks per sample. Few, big samples on a 1-SM device split
    # whatever the cache; small ones split when the fused blocks' samples would not fit
    # in L2, which a 64 KiB L2 forces at a few thousand elements (cheap to emulate).
    big = dict(sms=1)
    tiny_l2 = dict(sms=1, l2_bytes=64 << 10)
    for op in ("l2_step", "l2_project"):
        add(f"{op}-split-2x40000", _case(op, (2, 40000), F32, seed, **big))
        add(f"{op}-split-3x9999-odd", _case(op, (3, 9999), F32, seed, **tiny_l2))
        add(f"{op}-split-bf16", _case(op, (2, 3, 40, 40), BF16, seed, **tiny_l2))
        add(f"{op}-split-per-sample", _case(op, (3, 8000), F32, seed, alpha=torch.tensor([0.0, 0.1, 0.5]),
                                          eps=torch.tensor([0.0, 0.3, 50.0]), **tiny_l2))
        add(f"{op}-split-in-place", _case(op, (2, 8000), F16, seed, in_place=True, **tiny_l2))
        add(f"{op}-split-misaligned", _case(op, (2, 8000), F32, seed, offsets=(0, 0, 1, 0), **tiny_l2))
        add(f"{op}-split-1x3x64x64", _case(op, (1, 3, 64, 64), F32, seed, **tiny_l2))
    add("l2_step-split-small-samples", _case("l2_step", (4, 5000), F32, seed, **tiny_l2))
    add("l2_project-split-small-samples", _case("l2_project", (5, 4099), BF16, seed, **tiny_l2))
    c = _case("l2_step", (2, 8000), F32, seed, **tiny_l2)
    c.grad.view(-1)[::5] = float("nan")
    c.grad[1] = 0.0
    add("l2_step-split-nonfinite", c)
    # B = 1 at ImageNet size (L∞ caps its grid) and single elements.
    add("linf_step-1x3x224x224", _case("linf_step", (1, 3, 224, 224), F32, seed))
    for op in ops:
        add(f"{op}-1x1", _case(op, (1, 1), F32, seed))
        add(f"{op}-empty", _case(op, (0, 5), F32, seed))
    return cases


CASES = _build_cases()
_FAILS = {  # cases whose launcher must refuse, with the error it returns
    "l2_step-bad-per-sample": (_case("l2_step", (2, 5), F32, 0, per_sample=3), ERR_INVALID_VALUE),
    "l2_project-bad-per-sample": (_case("l2_project", (2, 5), F32, 0, per_sample=4), ERR_INVALID_VALUE),
    "linf_step-zero-per-sample": (_case("linf_step", (2, 5), F32, 0, per_sample=0), ERR_INVALID_VALUE),
}


def _all_cases():
    return list(CASES.values()) + [c for c, _ in _FAILS.values()]


@pytest.fixture(scope="module")
def plain_results():
    results = H.run(_all_cases(), "plain")
    return dict(zip(list(CASES) + list(_FAILS), results))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN (any payload)."""
    an, bn = torch.isnan(a.float()), torch.isnan(b.float())
    return bool(torch.equal(an, bn) and torch.equal(a[~an], b[~bn]))


def _check(case: H.Case, res: H.Result):
    assert res.err == 0, f"launcher returned cudaError {res.err}"
    expect = case.reference()
    out = res.out
    assert out.dtype == expect.dtype and out.shape == expect.shape
    if case.op.startswith("linf"):
        # Elementwise, the same float32 operations as the reference: the same bits.
        assert _same(out, expect)
        return
    nan = torch.isnan(expect.float())
    assert torch.equal(torch.isnan(out.float()), nan)
    diff = (out.float() - expect.float()).abs()[~nan]
    if case.x.dtype == F32:
        assert diff.max().item() <= 1e-6 if diff.numel() else True
    else:
        ulp = torch.finfo(case.x.dtype).eps * expect.float().abs().clamp_min(1.0)[~nan]
        assert bool((diff <= ulp).all())


@pytest.mark.parametrize("name", list(CASES))
def test_launcher_matches_reference(name, plain_results):
    _check(CASES[name], plain_results[name])


@pytest.mark.parametrize("name", list(_FAILS))
def test_launcher_refuses_bad_layout(name, plain_results):
    assert plain_results[name].err == _FAILS[name][1]
    assert plain_results[name].launches == []


def _kernels(res):
    return [name for name, _, _ in res.launches]


SPLIT = "l2_split_kernel<X, G, VEC, STEP>"
FUSED = "l2_fused_kernel<X, G, VEC, STEP>"


def test_schedules_and_paths_are_the_ones_meant(plain_results):
    """The cases exercise what their names say: the split L2 schedule (in several waves),
    the scalar path for misaligned pointers and the vector path otherwise, no launch for
    an empty batch."""
    r = plain_results
    for name in CASES:
        res = r[name]
        if name.startswith("l2") and res.launches:
            split = res.schedule.blocks_per_sample > 1
            assert _kernels(res) == [SPLIT if split else FUSED], name
            assert (res.workspace_bytes > 0) == split, name
            assert res.launches[0][1][0] == res.schedule.blocks, name
            # the split cases split; the ops tests' small shapes (and 3x1x28x28 etc.) do not
            assert split == ("-split-" in name), name
        if "misaligned" in name and name.startswith("linf"):
            assert _kernels(res) == ["linf_kernel<X, G, 1, STEP>"], name
        if name.endswith("-empty"):
            assert res.launches == [], name
    assert _kernels(r["linf_step-4x3x32x32-torch.float32"]) == ["linf_kernel<X, G, VEC, STEP>"]
    # more than one wave: the step's 3 and the projection's 2 phases overlap across groups
    sched = r["l2_step-split-small-samples"].schedule
    assert sched.samples_per_group == 1 and sched.blocks == 3 * 4 * sched.blocks_per_sample
    assert r["l2_project-split-3x9999-odd"].schedule.samples_per_group < 3


def test_split_schedule_is_independent_of_block_order(plain_results):
    """Blocks take their work from a ticket, not from blockIdx: run in reverse order, every
    split case gives the same bits (its sums are added in a fixed order)."""
    names = [n for n in CASES if "-split-" in n]
    results = H.run([CASES[n] for n in names], "plain", env={"CUDA_EMU_BLOCK_ORDER": "reverse"})
    for name, res in zip(names, results):
        assert _same(res.out, plain_results[name].out), name


# ---------------------------------------------------------------- sanitizers
@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_same_cases_clean_under_sanitizer(variant, plain_results):
    """Every case again under AddressSanitizer+UBSan / ThreadSanitizer: no report, and the
    same bits and launches as the plain build."""
    results = H.run(_all_cases(), variant)
    for name, res in zip(list(CASES) + list(_FAILS), results):
        plain = plain_results[name]
        assert res.err == plain.err and res.launches == plain.launches, name
        assert _same(res.out, plain.out), name


# ---------------------------------------------------------------- planted bugs
def _planted(tmp_path, filename, old, new):
    """A copy of kernels/ with one edit in one file."""
    dst = tmp_path / "kernels"
    shutil.copytree(H.KERNELS, dst)
    text = (dst / filename).read_text()
    assert text.count(old) == 1, f"the text to plant the bug in is gone from {filename}: {old!r}"
    (dst / filename).write_text(text.replace(old, new))
    return dst


def test_tsan_catches_a_missing_syncthreads(tmp_path):
    """Without the barrier after thread 0 writes a sample's total to shared memory, the
    other threads read it unsynchronised: a race ThreadSanitizer must report."""
    src = _planted(tmp_path, "l2.cu", "    if (threadIdx.x == 0) *shared_out = static_cast<float>(acc);\n"
                   "  }\n  __syncthreads();\n",
                   "    if (threadIdx.x == 0) *shared_out = static_cast<float>(acc);\n  }\n")
    case = CASES["l2_step-split-2x40000"]
    with pytest.raises(H.RunFailed) as info:
        H.run([case], "tsan", kernels=src)
    assert "ThreadSanitizer: data race" in info.value.log
    assert "sum_partials" in info.value.log


def test_asan_catches_a_tail_overrun(tmp_path):
    """The L∞ tail loop running one element past the end reads x[numel]: ASan must stop it."""
    src = _planted(tmp_path, "linf.cu", "for (int64_t i = nvec * VEC + first; i < p.numel; i += stride)",
                   "for (int64_t i = nvec * VEC + first; i <= p.numel; i += stride)")
    case = CASES["linf_step-1x3x5x7-torch.float32"]  # 105 elements: a tail of 1
    with pytest.raises(H.RunFailed) as info:
        H.run([case], "asan", kernels=src)
    assert "AddressSanitizer: heap-buffer-overflow" in info.value.log
    assert re.search(r"linf_kernel<float, float, 4, true>", info.value.log)


def test_comparison_catches_a_tail_underrun(tmp_path):
    """The tail loop starting one element late leaves the last element unwritten (the
    driver fills outputs with NaN first): the comparison with the reference must fail."""
    src = _planted(tmp_path, "linf.cu", "for (int64_t i = nvec * VEC + first; i < p.numel; i += stride)",
                   "for (int64_t i = nvec * VEC + first + 1; i < p.numel; i += stride)")
    case = CASES["linf_step-1x3x5x7-torch.float32"]
    (res,) = H.run([case], "plain", kernels=src)
    with pytest.raises(AssertionError):
        _check(case, res)
    assert torch.isnan(res.out.view(-1)[-1]) and not torch.isnan(res.out.view(-1)[:-1]).any()


def test_emulator_catches_a_wait_on_a_later_block(tmp_path):
    """A split kernel that takes its place from blockIdx instead of the ticket waits, when
    blocks start in another order, on blocks that have not started: a GPU may hang there.
    In order it happens to work; in reverse the emulator must report the endless wait."""
    src = _planted(tmp_path, "l2.cu", "static_cast<int64_t>(atomicAdd(p.ticket, 1u))",
                   "static_cast<int64_t>(blockIdx.x)")
    case = CASES["l2_step-split-2x40000"]
    (res,) = H.run([case], "plain", kernels=src)
    _check(case, res)
    with pytest.raises(H.RunFailed) as info:
        H.run([case], "plain", kernels=src, env={"CUDA_EMU_BLOCK_ORDER": "reverse"})
    assert "keeps waiting" in info.value.log


def test_rewrite_of_launch_syntax():
    src = ("if (s) k<A, B<C>, 4><<<dim3(n), kThreads, 0, stream>>>(p, q);\n"
           "  ns::plain<<<1, 32>>>();")
    out = H.rewrite_launches(src)
    assert out == ('if (s) ::cuda_emu::Launch(dim3(n), kThreads, 0, stream).kernel(k<A, B<C>, 4>, '
                   '"k<A, B<C>, 4>")(p, q);\n  ::cuda_emu::Launch(1, 32).kernel(ns::plain, "ns::plain")();')
