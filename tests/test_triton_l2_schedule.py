"""The triton backend's L2 schedule: the chooser's decisions and DRAM-byte estimates by
arithmetic and against an LRU model of the L2 cache, and each schedule kind against
``fastadv.ops.reference`` under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``).

The device assumed for the arithmetic is an H200 (132 SMs, 50 MiB of L2), not measured:
``l2_schedule`` is pure arithmetic, so none of this needs a GPU. Under the interpreter the
chooser sees the small GPU of ``INTERPRET_SMS`` / ``INTERPRET_L2_BYTES``; the tests set
those so that small tensors take each kind: fused, split with several programs a sample,
split in waves, split with a sample too big for any wave.
"""
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("triton")

from fastadv import ops  # noqa: E402
from fastadv.ops import _triton_backend as tb  # noqa: E402
from fastadv.ops import reference as ref  # noqa: E402

H200 = dict(sms=132, l2_bytes=50 << 20)
IMAGENET, CIFAR, MNIST = 3 * 224 * 224, 3 * 32 * 32, 28 * 28


def _tensor_sizes(est, batch, per_sample, elem_bytes=4):
    return est / (batch * per_sample * elem_bytes)


# ----------------------------------------------- an LRU model of the L2 cache
def _simulated_dram_bytes(s, batch, per_sample, xb, gb, l2_bytes, sms):
    """DRAM bytes schedule ``s`` moves through an LRU cache of ``l2_bytes``, at the
    granularity of one program's chunk of one tensor. Split: the launches in order,
    programs in order within one. Fused: ``RESIDENT_PER_SM * sms`` samples in flight,
    walked in lock step, block by block, sweep by sweep. Reads that miss and every
    write (written back once) count; written lines occupy the cache like read ones."""
    lru, used, dram = OrderedDict(), 0, 0

    def touch(key, nbytes, write=False):
        nonlocal used, dram
        if key in lru:
            lru.move_to_end(key)
        else:
            dram += 0 if write else nbytes
            lru[key] = nbytes
            used += nbytes
            while used > l2_bytes:
                used -= lru.popitem(last=False)[1]
        dram += nbytes if write else 0

    step = gb > 0
    reads = [("g",)] if step else []
    sweeps = ([reads] if step else []) + [[("x",), ("n",)] + reads, [("x",), ("n",)] + reads + [("o",)]]
    size = {"x": xb, "n": xb, "g": gb, "o": xb}
    chunk = s.block * s.iters
    parts = [(c, min(chunk, per_sample - c * chunk)) for c in range(s.tiles if s.kind == "split" else
                                                                     -(-per_sample // s.block))]
    if s.kind == "split":
        groups = [range(w, min(w + s.samples_per_wave, batch)) for w in range(0, batch, s.samples_per_wave)]
    else:
        flight = tb.RESIDENT_PER_SM * sms
        groups = [range(w, min(w + flight, batch)) for w in range(0, batch, flight)]
    for group in groups:
        for sweep in sweeps:
            if s.kind == "split":   # a launch: program (sample, tile) in order
                order = [(b, c, n) for b in group for c, n in parts]
            else:                   # in flight together: block c of every sample, then c + 1
                order = [(b, c, n) for c, n in parts for b in group]
            for b, c, n in order:
                for (t,) in sweep:
                    touch((t, b, c), n * size[t], write=t == "o")
    return dram


def _check_model(s, batch, per_sample, xb, gb, l2_bytes=H200["l2_bytes"], sms=H200["sms"]):
    """The chooser's estimate agrees with the LRU model within 10%; returns the model's bytes."""
    sim = _simulated_dram_bytes(s, batch, per_sample, xb, gb, l2_bytes, sms)
    assert 0.9 * s.est_dram_bytes <= sim <= 1.1 * s.est_dram_bytes, (s, sim)
    return sim


# ---------------------------------------------------------- the chooser's picks
def test_imagenet_batch512_moves_four_tensor_sizes_not_eight():
    """3x224x224 fp32 at batch 512 on an H200: split in L2-sized waves, ~4 tensor-sizes of
    DRAM traffic; the old schedules (the split passes over the whole batch, or one program
    per sample with 528 samples in flight) move ~8."""
    b, n = 512, IMAGENET
    new = tb.l2_schedule(b, n, 4, 4, **H200)
    assert new.kind == "split" and new.waves > 1 and new.launches == 3 * new.waves
    assert new.samples_per_wave * n * 16 <= tb.L2_FRACTION * H200["l2_bytes"]  # a wave fits
    assert new.programs >= tb.FILL_PER_SM * H200["sms"]                         # and fills the GPU
    assert new.est_dram_bytes == new.min_dram_bytes == 4 * b * n * 4
    assert _tensor_sizes(_check_model(new, b, n, 4, 4), b, n) <= 4.5

    whole_batch = tb.l2_schedule(b, n, 4, 4, **H200, waves=False)   # the old split path
    assert whole_batch.kind == "split" and whole_batch.waves == 1
    per_sample = tb.l2_schedule(b, n, 4, 4, **H200, force="fused")  # the old fused schedule
    for old in (whole_batch, per_sample):
        assert _tensor_sizes(old.est_dram_bytes, b, n) == 8
        assert _tensor_sizes(_check_model(old, b, n, 4, 4), b, n) >= 7.5


@pytest.mark.parametrize("xb,gb,minimum,swept", [(4, 0, 3, 5), (2, 2, 4, 8), (2, 4, 5, 11)],
                         ids=["project_fp32", "step_bf16", "step_bf16_grad_fp32"])
def test_imagenet_other_dtypes_and_projection(xb, gb, minimum, swept):
    """The same at other element sizes, in units of x's tensor: the projection reads x and
    x_nat and writes out (3, not 5); a float32 gradient for bfloat16 x weighs 2 units."""
    b, n = 512, IMAGENET
    s = tb.l2_schedule(b, n, xb, gb, **H200)
    assert s.kind == "split" and s.waves > 1 and s.launches == (3 if gb else 2) * s.waves
    assert s.est_dram_bytes == minimum * b * n * xb
    _check_model(s, b, n, xb, gb)
    old = tb.l2_schedule(b, n, xb, gb, **H200, waves=False)
    assert old.est_dram_bytes == swept * b * n * xb
    _check_model(old, b, n, xb, gb)


@pytest.mark.parametrize("batch,per_sample", [(128, CIFAR), (32, CIFAR), (128, MNIST), (2, IMAGENET), (64, IMAGENET)])
def test_underfilled_batch_gets_several_programs_a_sample(batch, per_sample):
    """A batch under 4 programs an SM (CIFAR at 128 on 132 SMs) is split so that a launch
    fills the SMs: >= 132 programs."""
    s = tb.l2_schedule(batch, per_sample, 4, 4, **H200)
    assert s.kind == "split" and s.tiles > 1
    assert s.programs >= H200["sms"]
    assert s.est_dram_bytes == s.min_dram_bytes
    _check_model(s, batch, per_sample, 4, 4)
    if batch * per_sample * 16 <= tb.L2_FRACTION * H200["l2_bytes"]:
        assert s.waves == 1 and s.launches == 3


@pytest.mark.parametrize("batch,per_sample,xb", [(1024, CIFAR, 4), (4096, CIFAR, 4), (1024, MNIST, 4),
                                                 (8192, CIFAR, 2), (600, 100, 4)])
def test_small_samples_at_large_batch_stay_fused(batch, per_sample, xb):
    """One launch, one program per sample, and the samples in flight fit in L2: the sweeps
    after the first re-read from cache (the LRU model agrees)."""
    s = tb.l2_schedule(batch, per_sample, xb, xb, **H200)
    assert s.kind == "fused" and s.launches == 1 and s.programs == batch and s.tiles == 1
    assert s.est_dram_bytes == s.min_dram_bytes
    _check_model(s, batch, per_sample, xb, xb)


def test_single_big_sample_takes_as_many_programs_as_allowed():
    """Batch 1 of 3x224x224 cannot fill 132 SMs within MAX_TILES power-of-two chunks of a
    sample: it takes the most it can (74 chunks of 2048; 1024 would make 147 > 128)."""
    s = tb.l2_schedule(1, IMAGENET, 4, 4, **H200)
    assert s.kind == "split" and s.tiles >= tb.MAX_TILES // 2 and s.launches == 3
    assert s.est_dram_bytes == s.min_dram_bytes


def test_medium_samples_at_large_batch_split_in_waves():
    """3x64x64 at batch 2048: the 528 samples a fused launch has in flight do not fit in L2
    (~8 tensor-sizes); the split path in waves keeps to 4."""
    b, n = 2048, 3 * 64 * 64
    fused = tb.l2_schedule(b, n, 4, 4, **H200, force="fused")
    s = tb.l2_schedule(b, n, 4, 4, **H200)
    assert s.kind == "split" and s.waves > 1
    assert _tensor_sizes(_check_model(s, b, n, 4, 4), b, n) <= 4.5
    assert _tensor_sizes(_check_model(fused, b, n, 4, 4), b, n) >= 7  # a few late re-reads hit


def test_sample_bigger_than_the_budget_runs_as_one_wave():
    """A sample whose four tensors exceed L2_FRACTION of L2 cannot be kept there by waves:
    one wave (3 launches), and the estimate says so (8 tensor-sizes)."""
    b, n = 8, 3 * 1024 * 1024
    s = tb.l2_schedule(b, n, 4, 4, **H200)
    assert s.kind == "split" and s.waves == 1 and s.launches == 3 and s.tiles == tb.MAX_TILES
    assert _tensor_sizes(s.est_dram_bytes, b, n) == 8


def test_one_wave_estimate_depends_on_the_whole_batch_fitting():
    """waves=False (the previous split path): 4 tensor-sizes while the whole batch fits in
    the budget, 8 once it does not."""
    small = tb.l2_schedule(2, 3 * 64 * 64, 4, 4, **H200, force="split", waves=False)
    assert small.waves == 1 and small.est_dram_bytes == small.min_dram_bytes
    big = tb.l2_schedule(256, 3 * 64 * 64, 4, 4, **H200, force="split", waves=False)  # 50 MB
    assert big.waves == 1 and big.est_dram_bytes == 2 * big.min_dram_bytes


def test_previous_schedule_context():
    """benchmarks' "prev" rows: fused up to FUSED_L2_MAX elements, else one wave; restored after."""
    probe = torch.empty(4, 3, 64, 64)
    before = tb.schedule_for(probe, probe)
    with tb.previous_l2_schedule(3 * 64 * 64):
        prev = tb.schedule_for(probe, probe)
    assert prev.kind == "split" and prev.waves == 1
    assert tb.schedule_for(probe, probe) == before and tb.L2_SCHEDULE is None and tb.L2_WAVES is True
    with tb.previous_l2_schedule(100):
        assert tb.schedule_for(torch.empty(2, 100), None).kind == "fused"


def test_schedule_arguments_checked():
    with pytest.raises(ValueError, match="batch"):
        tb.l2_schedule(0, 10, 4, 4, **H200)
    with pytest.raises(ValueError, match="force"):
        tb.l2_schedule(4, 10, 4, 4, **H200, force="waves")


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 128, 513])
@pytest.mark.parametrize("per_sample", [1, 15, 100, 1000, CIFAR, 12345, IMAGENET, 10 ** 6])
def test_split_tiling_covers_each_sample(batch, per_sample):
    """Tiles of block*iters cover a sample with none empty, at most MAX_TILES; waves cover
    the batch with none empty; blocks are powers of two within the bounds."""
    s = tb.l2_schedule(batch, per_sample, 4, 4, **H200, force="split")
    chunk = s.block * s.iters
    assert s.tiles <= tb.MAX_TILES and (s.tiles - 1) * chunk < per_sample <= s.tiles * chunk
    assert (s.waves - 1) * s.samples_per_wave < batch <= s.waves * s.samples_per_wave
    assert s.block & (s.block - 1) == 0 and tb.GPU_MIN_BLOCK <= s.block <= tb.GPU_MAX_BLOCK


# ----------------------------------------- each kind against the reference (interpreter)
_status = ops.backends()["triton"]
needs_backend = pytest.mark.skipif(_status is not True, reason=f"triton backend not available: {_status}")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _data(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g)
    x_adv = (x_nat + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    grad.view(-1)[0] = float("nan")  # a non-finite entry counts as 0 in the norm
    return tuple(t.to(dtype).to(DEVICE) for t in (x_adv, x_nat, grad))


def _ordered(t):
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_matches(out, expect):
    out, expect = out.cpu(), expect.cpu()
    assert torch.isfinite(out).all(), "a sample was left unwritten (NaN from the prefill)"
    if out.dtype == torch.float32:
        err = (out - expect).abs().max().item()
        assert err <= 1e-6, f"max abs error {err:g}"
    else:
        ulps = (_ordered(out) - _ordered(expect)).abs().max().item()
        assert ulps <= 1, f"{ulps} units in the last place from the reference"


class _Recorder:
    """Stands in for a kernel: records each launch's grid and pid0, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid[0], args[-1]))  # pid0 is the last positional argument
            return self.kernel[grid](*args, **kwargs)
        return launch


# name: (shape, INTERPRET_SMS, samples a wave (None: L2 as big as needed, 0: smaller than
# a sample), the kind and property the case is meant to walk)
KINDS = {
    "fused": ((6, 3, 5, 7), 1, None),
    "split-programs": ((2, 3, 7, 5), 2, None),
    "split-waves": ((5, 2, 9, 7), 1, 2),
    "split-unfit": ((3, 3, 11, 7), 2, 0),
}


def _configure(monkeypatch, kind, shape, dtype, step):
    """Sets the interpreter's GPU so that ``shape`` takes ``kind``; returns the schedule."""
    _, sms, per_wave = KINDS[kind]
    batch, per_sample = shape[0], torch.Size(shape[1:]).numel()
    xb = torch.empty((), dtype=dtype).element_size()
    wave_bytes = per_sample * (3 * xb + (xb if step else 0))
    if per_wave is None:
        l2 = 1 << 30
    elif per_wave == 0:
        l2 = wave_bytes  # half a sample's four tensors: no wave fits
    else:
        l2 = int(-(-per_wave * wave_bytes // tb.L2_FRACTION))
    monkeypatch.setattr(tb, "INTERPRET_BLOCK", 32)
    monkeypatch.setattr(tb, "MAX_TILES", 8)
    monkeypatch.setattr(tb, "INTERPRET_SMS", sms)
    monkeypatch.setattr(tb, "INTERPRET_L2_BYTES", l2)
    probe = torch.empty(shape, dtype=dtype, device=DEVICE)
    s = tb.schedule_for(probe, probe if step else None)
    if kind == "fused":
        assert s.kind == "fused"
    else:
        assert s.kind == "split"
    if kind == "split-programs":
        assert s.tiles > 1 and s.waves == 1 and s.programs >= tb.FILL_PER_SM * sms
    if kind == "split-waves":
        assert s.samples_per_wave == per_wave and s.waves == -(-batch // per_wave) > 1
        assert s.est_dram_bytes == s.min_dram_bytes
    if kind == "split-unfit":
        assert s.waves == 1 and s.est_dram_bytes > s.min_dram_bytes
    return s


@needs_backend
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's GPU model is for the CPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["l2_step", "l2_project"])
def test_each_kind_matches_reference(name, kind, dtype, monkeypatch):
    step = name == "l2_step"
    shape = KINDS[kind][0]
    s = _configure(monkeypatch, kind, shape, dtype, step)
    x_adv, x_nat, grad = _data(shape, dtype, seed=len(kind) + 7 * DTYPES.index(dtype))
    b = shape[0]
    alpha = torch.linspace(0.05, 0.5, b, device=DEVICE)
    eps = torch.linspace(0.02, 2.0, b, device=DEVICE)
    if b > 2:
        eps[1] = 0.0  # a sample pinned to x_nat
    recorders = {k: _Recorder(getattr(tb, k)) for k in
                 ("_l2_grad_sumsq_kernel", "_l2_delta_sumsq_kernel", "_l2_apply_kernel")}
    for k, r in recorders.items():
        monkeypatch.setattr(tb, k, r)
    for a, e in ((alpha, eps), (0.3, 0.4)):
        out = torch.full_like(x_adv, float("nan"))
        if step:
            tb.backend.l2_step(out, x_adv, x_nat, grad, a, e, 0.0, 1.0)
            expect = ref.l2_step(x_adv, x_nat, grad, a, e)
        else:
            tb.backend.l2_project(out, x_adv, x_nat, e, 0.0, 1.0)
            expect = ref.l2_project(x_adv, x_nat, e)
        _assert_matches(out, expect)
    # the launches are the schedule's: waves of tiles that cover the batch once, in order
    apply = recorders["_l2_apply_kernel"].launches
    if s.kind == "fused":
        assert apply == []
        return
    assert len(apply) == 2 * s.waves
    covered = [(pid0, pid0 + n) for n, pid0 in apply[:s.waves]]
    assert covered[0][0] == 0 and covered[-1][1] == b * s.tiles
    assert all(end == nxt for (_, end), (nxt, _) in zip(covered, covered[1:]))
    assert len(recorders["_l2_grad_sumsq_kernel"].launches) == (2 * s.waves if step else 0)


@needs_backend
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's GPU model is for the CPU")
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_in_place_and_public_op(kind, monkeypatch):
    """out aliasing x_adv (the in-place op) and the public op, batch 1 included, odd sizes."""
    shape = KINDS[kind][0]
    _configure(monkeypatch, kind, shape, torch.float32, True)
    x_adv, x_nat, grad = _data(shape, torch.float32, seed=3)
    expect = ref.l2_step(x_adv, x_nat, grad, 0.2, 0.3)
    _assert_matches(ops.l2_step(x_adv, x_nat, grad, 0.2, 0.3, backend="triton"), expect)
    inplace = x_adv.clone()
    ops.l2_step_(inplace, x_nat, grad, 0.2, 0.3, backend="triton")
    _assert_matches(inplace, expect)
    one = tuple(t[:1].clone() for t in (x_adv, x_nat, grad))
    _assert_matches(ops.l2_project(one[0], one[1], 0.05, backend="triton"), ref.l2_project(one[0], one[1], 0.05))
