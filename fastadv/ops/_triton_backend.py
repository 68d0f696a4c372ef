"""The triton backend: the fused L∞/L2 steps and projections as Triton kernels.

Layout of this file: the ``@triton.jit`` kernels (and the small jit helpers they
share), then plain launchers that pick block sizes and grids, then ``backend``,
the object ``fastadv.ops._registry`` dispatches to.

The kernel-level contract is the one in ``_registry``: every tensor has the same
shape and strides, is non-overlapping and dense with the batch outermost, so the
kernels walk flat storage ``0 .. numel-1`` (Triton takes the data pointer) and
sample ``b`` owns storage ``[b*N, (b+1)*N)`` with ``N = numel // B``. Every launch
tiles storage so that no tile straddles two samples whenever a per-sample value
is needed: a per-sample ``alpha``/``eps`` is then one scalar load per program, and
no per-element integer division is spent on finding the sample.

Arithmetic is float32 and follows ``fastadv.ops.reference`` operation by
operation (sign(0) = 0, a NaN gradient moves nothing in L∞, non-finite gradient
entries count as 0 in L2, the 1e-12 floor on ‖g‖, no 0/0 in the ball factor);
results are stored in the output's dtype (round to nearest even). Fused
multiply-add is switched off so that every operation rounds as the reference's
does. L∞ ops therefore match the reference bit for bit; L2 ops differ by the
order of the float32 sums behind the two norms and by taking alpha/‖g‖ once per
sample instead of g/‖g‖ per element (a rounding or two of float32).

A per-sample ‖g‖² or ‖δ‖² beyond float32's range (|g| around 1e19 and up) is
inf, as in the float32 reference: such a gradient moves nothing.

The L2 ops' schedule (one program per sample, or several, in waves sized to L2) is
chosen by ``l2_schedule``, plain arithmetic that also estimates the DRAM traffic.

Runs on CUDA GPUs, and on the CPU only under ``TRITON_INTERPRET=1`` (set before
triton is first imported), which is how the tests run on machines without GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import reference

_GRAD_NORM_FLOOR = tl.constexpr(reference.GRAD_NORM_FLOOR)
# Largest finite float32: |g| <= this is false exactly for NaN and ±inf.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_NAN_ALL = tl.constexpr(tl.PropagateNan.ALL)


# =================================================================== kernels
# Jit helpers are inlined on the GPU; under the interpreter each call costs about a
# millisecond, so the per-block work calls at most two of them.
@triton.jit
def _as_f32(alpha, eps, lower, upper):
    """The float arguments as float32 scalars. They already are on the GPU; under the
    interpreter a Python float outside float32's normal range would compute in float64."""
    return (tl.cast(alpha, tl.float32), tl.cast(eps, tl.float32),
            tl.cast(lower, tl.float32), tl.cast(upper, tl.float32))


@triton.jit
def _sample_span(pid, per_sample, tiles, CHUNK: tl.constexpr):
    """Tile ``pid`` of a per-sample tiling: (sample, first offset, end of the sample)."""
    sample = pid // tiles
    base = sample * per_sample
    return sample, base + (pid - sample * tiles) * CHUNK, base + per_sample


@triton.jit
def _store(ptr, offs, x, mask):
    """Store float32 ``x`` in the pointer's dtype, rounding to nearest even. bfloat16 is
    rounded by hand (as c10::BFloat16 does) because Triton's CPU interpreter truncates."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # NaN stays a (quiet) NaN
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_point(x_ptr, nat_ptr, grad_ptr, offs, mask, coef, HAS_GRAD: tl.constexpr):
    """(x, x_nat) in float32, x moved by coef*g (non-finite g counts as 0) for a step.
    Masked-off lanes are 0 in both, so they add nothing to ‖x - x_nat‖²."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x + tl.where(tl.abs(g) <= _FLT_MAX, g, 0.0) * coef
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x, nat


@triton.jit
def _ball_factor(sumsq, eps):
    """min(1, eps/‖δ‖) from ‖δ‖², and 1 (not 0/0) whenever ‖δ‖ <= eps."""
    norm = tl.sqrt_rn(sumsq)
    outside = norm > eps
    return tl.where(outside, tl.div_rn(eps, tl.where(outside, norm, 1.0)), 1.0)


@triton.jit
def _linf_kernel(out_ptr, x_ptr, nat_ptr, grad_ptr,
                 alpha_ptr, alpha, eps_ptr, eps, lower, upper,
                 numel, per_sample, tiles,
                 HAS_GRAD: tl.constexpr, HAS_ALPHA_T: tl.constexpr, HAS_EPS_T: tl.constexpr,
                 BLOCK: tl.constexpr):
    """linf_step (HAS_GRAD) or linf_project: one BLOCK of flat storage per program."""
    alpha, eps, lower, upper = _as_f32(alpha, eps, lower, upper)
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ALPHA_T or HAS_EPS_T:
        sample, start, end = _sample_span(pid, per_sample, tiles, BLOCK)
        if HAS_ALPHA_T:
            alpha = tl.load(alpha_ptr + sample)
        if HAS_EPS_T:
            eps = tl.load(eps_ptr + sample)
    else:
        start = pid * BLOCK
        end = numel
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # alpha*sign(g) without a multiply: ±alpha or 0; NaN fails both tests and moves nothing.
        x = x + tl.where(g > 0, alpha, tl.where(g < 0, -alpha, 0.0))
    # Clamp into the ball, then into the bounds; NaN propagates as in torch.clamp.
    x = tl.minimum(tl.maximum(x, nat - eps, _NAN_ALL), nat + eps, _NAN_ALL)
    x = tl.minimum(tl.maximum(x, lower, _NAN_ALL), upper, _NAN_ALL)
    _store(out_ptr, offs, x, mask)


@triton.jit
def _l2_fused_kernel(out_ptr, x_ptr, nat_ptr, grad_ptr,
                     alpha_ptr, alpha, eps_ptr, eps, lower, upper, per_sample,
                     HAS_GRAD: tl.constexpr, HAS_ALPHA_T: tl.constexpr, HAS_EPS_T: tl.constexpr,
                     BLOCK: tl.constexpr):
    """l2_step (HAS_GRAD) or l2_project for one whole sample per program: ‖g‖, then ‖δ‖,
    then the update, three sweeps over the sample (re-read from cache when it is small)."""
    alpha, eps, lower, upper = _as_f32(alpha, eps, lower, upper)
    sample = tl.program_id(0).to(tl.int64)
    base = sample * per_sample
    end = base + per_sample
    if HAS_ALPHA_T:
        alpha = tl.load(alpha_ptr + sample)
    if HAS_EPS_T:
        eps = tl.load(eps_ptr + sample)

    coef = 0.0
    if HAS_GRAD:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, per_sample, BLOCK):
            offs = base + start + tl.arange(0, BLOCK)
            g = tl.load(grad_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
            g = tl.where(tl.abs(g) <= _FLT_MAX, g, 0.0)
            acc += g * g
        gnorm = tl.maximum(tl.sqrt_rn(tl.sum(acc, axis=0)), _GRAD_NORM_FLOOR)
        coef = tl.div_rn(alpha, gnorm)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, per_sample, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        x, nat = _l2_point(x_ptr, nat_ptr, grad_ptr, offs, offs < end, coef, HAS_GRAD)
        acc += (x - nat) * (x - nat)
    factor = _ball_factor(tl.sum(acc, axis=0), eps)

    for start in range(0, per_sample, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        mask = offs < end
        x, nat = _l2_point(x_ptr, nat_ptr, grad_ptr, offs, mask, coef, HAS_GRAD)
        x = tl.minimum(tl.maximum(nat + (x - nat) * factor, lower, _NAN_ALL), upper, _NAN_ALL)
        _store(out_ptr, offs, x, mask)


@triton.jit
def _sample_total(part_ptr, sample, tiles, TILES_P2: tl.constexpr):
    """Sum of one sample's ``tiles`` partial sums (row ``sample`` of a [B, tiles] array).
    Every program of the sample sums the same values in the same order, so all agree."""
    idx = tl.arange(0, TILES_P2)
    parts = tl.load(part_ptr + sample * tiles + idx, mask=idx < tiles, other=0.0)
    return tl.sum(parts, axis=0)


@triton.jit
def _l2_step_coef(gpart_ptr, alpha_ptr, alpha, sample, tiles,
                  HAS_ALPHA_T: tl.constexpr, TILES_P2: tl.constexpr):
    """alpha / max(‖g‖, 1e-12) of one sample from its partial sums."""
    if HAS_ALPHA_T:
        alpha = tl.load(alpha_ptr + sample)
    else:
        alpha = tl.cast(alpha, tl.float32)
    gsq = _sample_total(gpart_ptr, sample, tiles, TILES_P2)
    return tl.div_rn(alpha, tl.maximum(tl.sqrt_rn(gsq), _GRAD_NORM_FLOOR))


@triton.jit(do_not_specialize=["pid0"])
def _l2_grad_sumsq_kernel(gpart_ptr, grad_ptr, per_sample, tiles, pid0,
                          BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Split L2, pass 1: partial ‖finite(g)‖² of each chunk (BLOCK*ITERS) into gpart[pid].
    Program ``p`` of a launch is tile ``pid0 + p`` of the batch (a wave starts at ``pid0``)."""
    pid = tl.program_id(0).to(tl.int64) + pid0
    sample, start, end = _sample_span(pid, per_sample, tiles, BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(grad_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
        g = tl.where(tl.abs(g) <= _FLT_MAX, g, 0.0)
        acc += g * g
    tl.store(gpart_ptr + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["pid0"])
def _l2_delta_sumsq_kernel(dpart_ptr, x_ptr, nat_ptr, grad_ptr, gpart_ptr,
                           alpha_ptr, alpha, per_sample, tiles, pid0,
                           HAS_GRAD: tl.constexpr, HAS_ALPHA_T: tl.constexpr,
                           BLOCK: tl.constexpr, ITERS: tl.constexpr, TILES_P2: tl.constexpr):
    """Split L2, pass 2: partial ‖δ‖² of each chunk, δ = (stepped) x - x_nat."""
    pid = tl.program_id(0).to(tl.int64) + pid0
    sample, start, end = _sample_span(pid, per_sample, tiles, BLOCK * ITERS)
    coef = 0.0
    if HAS_GRAD:
        coef = _l2_step_coef(gpart_ptr, alpha_ptr, alpha, sample, tiles, HAS_ALPHA_T, TILES_P2)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        x, nat = _l2_point(x_ptr, nat_ptr, grad_ptr, offs, offs < end, coef, HAS_GRAD)
        acc += (x - nat) * (x - nat)
    tl.store(dpart_ptr + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["pid0"])
def _l2_apply_kernel(out_ptr, x_ptr, nat_ptr, grad_ptr, gpart_ptr, dpart_ptr,
                     alpha_ptr, alpha, eps_ptr, eps, lower, upper, per_sample, tiles, pid0,
                     HAS_GRAD: tl.constexpr, HAS_ALPHA_T: tl.constexpr, HAS_EPS_T: tl.constexpr,
                     BLOCK: tl.constexpr, ITERS: tl.constexpr, TILES_P2: tl.constexpr):
    """Split L2, pass 3: step (the arithmetic of pass 2), scale δ into the ball, clamp, store."""
    alpha, eps, lower, upper = _as_f32(alpha, eps, lower, upper)
    pid = tl.program_id(0).to(tl.int64) + pid0
    sample, start, end = _sample_span(pid, per_sample, tiles, BLOCK * ITERS)
    if HAS_EPS_T:
        eps = tl.load(eps_ptr + sample)
    coef = 0.0
    if HAS_GRAD:
        coef = _l2_step_coef(gpart_ptr, alpha_ptr, alpha, sample, tiles, HAS_ALPHA_T, TILES_P2)
    factor = _ball_factor(_sample_total(dpart_ptr, sample, tiles, TILES_P2), eps)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        x, nat = _l2_point(x_ptr, nat_ptr, grad_ptr, offs, mask, coef, HAS_GRAD)
        x = tl.minimum(tl.maximum(nat + (x - nat) * factor, lower, _NAN_ALL), upper, _NAN_ALL)
        _store(out_ptr, offs, x, mask)


# ================================================================= launchers
Scalar = Union[float, torch.Tensor]

# Split L2 keeps at most this many partial sums per sample, so that every program
# can re-sum its sample's row cheaply (a 3x224x224 sample has 74 chunks of 2048).
MAX_TILES = 128
# Per-sample sizes up to this may run L2 as one program per sample (one launch, the
# sample re-read from cache); l2_schedule decides whether they do.
FUSED_L2_MAX = 8192
# Under the interpreter each program costs ~1 ms of Python: use few, big blocks.
INTERPRET_BLOCK = 16384
# The GPU that l2_schedule assumes under the interpreter (no device to ask): small, so
# that the tests' small tensors walk the multi-program and wave paths.
INTERPRET_SMS = 1
INTERPRET_L2_BYTES = 1 << 20
# "fused" or "split" forces that L2 schedule kind (tests, benchmarks); None lets
# l2_schedule choose. L2_WAVES = False runs the split path over the whole batch at once
# (the benchmarks' "prev" rows: the schedule this backend had before waves).
L2_SCHEDULE: Optional[str] = None
L2_WAVES = True

# The cache model behind l2_schedule (sized for H100/H200: 132 SMs, 50 MiB of L2; the
# CUDA backend's kernels/l2.cu models it alike). Assumptions, to tune on a GPU:
# - a launch fills the GPU with at least FILL_PER_SM programs per SM;
# - RESIDENT_PER_SM fused programs (8 warps each; registers, not threads, the limit)
#   run on an SM at once: that many samples per SM are in flight in the fused schedule;
# - data re-read after at most L2_FRACTION of L2 has been touched since its first read
#   is an L2 hit; anything longer is read from DRAM again.
FILL_PER_SM = 4
RESIDENT_PER_SM = 4
L2_FRACTION = 0.5
GPU_MAX_BLOCK, GPU_MIN_BLOCK = 2048, 128
INTERPRET_MIN_BLOCK = 16

_device_caps_cache: Dict[int, Tuple[int, int]] = {}


class L2Schedule(NamedTuple):
    """How ``launch_l2`` runs one call, and the DRAM traffic that is estimated to move."""
    kind: str              # "fused": one program per sample, one launch; "split": passes
    block: int             # BLOCK, elements a program handles per loop iteration
    iters: int             # split: loop iterations a program (its chunk is block*iters)
    tiles: int             # programs per sample (1 when fused)
    samples_per_wave: int  # samples a launch covers (the batch, unless run in waves)
    waves: int
    launches: int          # kernel launches for the call
    programs: int          # programs in the largest launch
    est_dram_bytes: int    # the cache model's DRAM traffic for the call
    min_dram_bytes: int    # read x, x_nat (and grad) once, write out once

    @property
    def over_min(self) -> float:
        """est_dram_bytes / min_dram_bytes: 1 when every input is read once from DRAM;
        2 for a float32 step swept three times from DRAM (8 tensor-sizes, not 4)."""
        return self.est_dram_bytes / self.min_dram_bytes


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def l2_schedule(batch: int, per_sample: int, elem_bytes: int, grad_bytes: int, sms: int,
                l2_bytes: int, *, max_block: int = GPU_MAX_BLOCK, min_block: int = GPU_MIN_BLOCK,
                force: Optional[str] = None, waves: bool = True) -> L2Schedule:
    """The schedule of an L2 op over ``batch`` samples of ``per_sample`` elements:
    ``elem_bytes`` per element of x/x_nat/out, ``grad_bytes`` of grad (0: l2_project);
    ``sms`` multiprocessors, ``l2_bytes`` of L2 cache (0: unknown).

    * fused, one program per sample sweeping it three times (g², δ², write), when the
      batch fills the GPU (``FILL_PER_SM`` programs an SM) and the samples in flight fit
      in L2 (or L2's size is unknown), so the second and third sweeps hit the cache;
      and when a sample is too small to split at all. Never above ``FUSED_L2_MAX``.
    * split otherwise: ``tiles`` programs per sample, three launches (two for the
      projection) per wave of ``samples_per_wave`` samples, a wave's x, x_nat, grad and
      out sized to ``L2_FRACTION`` of L2 so that passes 2 and 3 re-read it from L2:
      ~4 tensor-sizes of DRAM traffic for a step instead of the ~8 of three sweeps
      from memory. ``tiles`` is raised until a launch has enough programs to fill the GPU.

    ``force`` picks the kind; ``waves=False`` makes the split path one wave whatever L2's
    size. Pure arithmetic on the module's knobs; the tests and benchmarks call it directly.
    """
    if batch < 1 or per_sample < 1:
        raise ValueError(f"l2_schedule: batch and per_sample must be >= 1, got {batch}, {per_sample}")
    if force not in (None, "fused", "split"):
        raise ValueError(f"l2_schedule: force must be None, 'fused' or 'split', got {force!r}")
    return _l2_schedule(int(batch), int(per_sample), int(elem_bytes), int(grad_bytes), max(1, int(sms)),
                        max(0, int(l2_bytes)), int(max_block), int(min_block), force, bool(waves),
                        FUSED_L2_MAX, MAX_TILES, FILL_PER_SM, RESIDENT_PER_SM, L2_FRACTION)


@functools.lru_cache(maxsize=256)
def _l2_schedule(batch, per_sample, xb, gb, sms, l2_bytes, max_block, min_block, force, waves_allowed,
                 fused_max, max_tiles, fill_per_sm, resident_per_sm, l2_fraction) -> L2Schedule:
    step = gb > 0
    numel = batch * per_sample
    min_bytes = numel * (3 * xb + gb)        # x, x_nat, grad read once; out written once
    swept_bytes = numel * (5 * xb + 3 * gb)  # g; x, x_nat, g; x, x_nat, g + out, all from DRAM
    budget = int(l2_bytes * l2_fraction)
    fill = fill_per_sm * sms
    most_tiles = max(1, min(max_tiles, triton.cdiv(per_sample, min_block)))

    in_flight = min(batch, resident_per_sm * sms)
    fused_fits = budget > 0 and in_flight * per_sample * (2 * xb + gb) <= budget
    if force is None:
        fused = per_sample <= fused_max and (
            most_tiles == 1 or (batch >= fill and (fused_fits or budget == 0)))
    else:
        fused = force == "fused"
    if fused:
        block = min(max_block, max(min_block, _pow2(per_sample)))
        return L2Schedule("fused", block, 1, 1, batch, 1, 1, batch,
                          min_bytes if fused_fits else swept_bytes, min_bytes)

    # Waves: as many samples as fit in the budget with all four tensors; one wave (the
    # whole batch) when even one sample does not fit, or L2's size is unknown.
    wave_bytes = per_sample * (3 * xb + gb)
    fits = budget >= wave_bytes * (1 if waves_allowed else batch)
    per_wave = min(batch, budget // wave_bytes) if fits and waves_allowed else batch
    waves = triton.cdiv(batch, per_wave)
    per_wave = triton.cdiv(batch, waves)  # even waves: 512 in 52 waves of <= 10, not 51 of 10 and 2
    # Chunks of ~max_block elements, more of them (down to min_block) while a launch has
    # fewer than `fill` programs, at most max_tiles a sample.
    want = max(triton.cdiv(per_sample, max_block), triton.cdiv(fill, per_wave))
    want = max(1, min(want, most_tiles))
    chunk = triton.cdiv(per_sample, want)
    if chunk >= max_block:  # big chunks: loop over max_block; block*iters >= chunk, so tiles <= want
        block, iters = max_block, triton.cdiv(chunk, max_block)
    else:  # one block a program: the power of two above chunk, or below it if that gives too few
        block, iters = max(min_block, _pow2(chunk)), 1
        below = max(min_block, _pow2_floor(chunk))
        if triton.cdiv(per_sample, block) < want and triton.cdiv(per_sample, below) <= max_tiles:
            block = below
    tiles = triton.cdiv(per_sample, block * iters)
    launches = waves * (3 if step else 2)
    return L2Schedule("split", block, iters, tiles, per_wave, waves, launches, per_wave * tiles,
                      min_bytes if fits else swept_bytes, min_bytes)


def _device_caps(device: torch.device) -> Tuple[int, int]:
    """(multiprocessors, L2 bytes; 0 if torch does not say) of a CUDA device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _device_caps_cache:
        props = torch.cuda.get_device_properties(idx)
        _device_caps_cache[idx] = (props.multi_processor_count, int(getattr(props, "L2_cache_size", 0) or 0))
    return _device_caps_cache[idx]


def _sm_count(device: torch.device) -> int:
    return _device_caps(device)[0]


def schedule_for(out: torch.Tensor, grad: Optional[torch.Tensor]) -> L2Schedule:
    """The L2 schedule ``launch_l2`` takes for ``out`` (and ``grad``; None: the projection):
    the device's SM count and L2 size on CUDA, ``INTERPRET_SMS`` / ``INTERPRET_L2_BYTES``
    and the interpreter's block sizes elsewhere."""
    batch = out.shape[0]
    per_sample = out.numel() // batch
    if out.device.type == "cuda":
        sms, l2_bytes = _device_caps(out.device)
        blocks = dict(max_block=GPU_MAX_BLOCK, min_block=GPU_MIN_BLOCK)
    else:
        sms, l2_bytes = INTERPRET_SMS, INTERPRET_L2_BYTES
        blocks = dict(max_block=INTERPRET_BLOCK, min_block=min(INTERPRET_MIN_BLOCK, INTERPRET_BLOCK))
    return l2_schedule(batch, per_sample, out.element_size(), 0 if grad is None else grad.element_size(),
                       sms, l2_bytes, force=L2_SCHEDULE, waves=L2_WAVES, **blocks)


@contextlib.contextmanager
def previous_l2_schedule(per_sample: int):
    """Within: the L2 schedule this backend took before l2_schedule (benchmarks' A/B rows):
    one program per sample up to FUSED_L2_MAX elements, else the split passes over the
    whole batch at once (no waves)."""
    global L2_SCHEDULE, L2_WAVES
    old = L2_SCHEDULE, L2_WAVES
    L2_SCHEDULE, L2_WAVES = ("fused" if per_sample <= FUSED_L2_MAX else "split"), False
    try:
        yield
    finally:
        L2_SCHEDULE, L2_WAVES = old


def _options(block: int) -> dict:
    # No fused multiply-add: each float32 operation rounds as in the reference (and
    # as under the interpreter); the kernels are memory-bound, so it costs nothing.
    return {"num_warps": 8 if block >= 2048 else 4, "enable_fp_fusion": False}


def _elementwise_block(n: int, device: torch.device) -> int:
    """BLOCK for a streaming pass over ``n`` elements (a sample, or all of storage)."""
    if device.type != "cuda":
        return min(INTERPRET_BLOCK, max(16, _pow2(n)))
    # Big tiles (16 elements a thread) when there are enough of them to fill every
    # SM a few times over; otherwise smaller ones so the grid still covers the GPU.
    if n >= 4096 * 4 * _sm_count(device):
        return 4096
    return min(1024, max(128, _pow2(n)))


def _scalar(v: Scalar) -> Tuple[Optional[torch.Tensor], float, bool]:
    """(tensor or None, float, is_tensor): a per-sample tensor travels by pointer,
    a float by value, so a float costs no allocation."""
    if isinstance(v, torch.Tensor):
        return v, 0.0, True
    return None, float(v), False


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_linf(out, x, x_nat, grad, alpha: Scalar, eps: Scalar, lower: float, upper: float) -> None:
    """``linf_step`` when ``grad`` is a tensor, ``linf_project`` when it is None."""
    numel = out.numel()
    batch = out.shape[0]
    per_sample = numel // batch
    a_t, a, has_a = _scalar(alpha)
    e_t, e, has_e = _scalar(eps)
    if has_a or has_e:
        block = _elementwise_block(per_sample, out.device)
        tiles = triton.cdiv(per_sample, block)
        grid = (batch * tiles,)
    else:
        block = _elementwise_block(numel, out.device)
        tiles = 1
        grid = (triton.cdiv(numel, block),)
    with _on_device(out.device):
        _linf_kernel[grid](out, x, x_nat, grad, a_t, a, e_t, e, float(lower), float(upper),
                           numel, per_sample, tiles,
                           HAS_GRAD=grad is not None, HAS_ALPHA_T=has_a, HAS_EPS_T=has_e,
                           BLOCK=block, **_options(block))


def launch_l2(out, x, x_nat, grad, alpha: Scalar, eps: Scalar, lower: float, upper: float) -> None:
    """``l2_step`` when ``grad`` is a tensor, ``l2_project`` when it is None (alpha unused),
    on the schedule ``schedule_for`` picks."""
    batch = out.shape[0]
    per_sample = out.numel() // batch
    a_t, a, has_a = _scalar(alpha)
    e_t, e, has_e = _scalar(eps)
    has_g = grad is not None
    lower, upper = float(lower), float(upper)
    device = out.device
    sched = schedule_for(out, grad)
    block = sched.block
    options = _options(block)

    if sched.kind == "fused":
        with _on_device(device):
            _l2_fused_kernel[(batch,)](out, x, x_nat, grad, a_t, a, e_t, e, lower, upper, per_sample,
                                       HAS_GRAD=has_g, HAS_ALPHA_T=has_a, HAS_EPS_T=has_e,
                                       BLOCK=block, **options)
        return

    # Split path: chunks of BLOCK*ITERS elements, `tiles` programs a sample; partial sums
    # go to a small [2, B, tiles] float32 workspace (from the caching allocator on the
    # current stream: safe under CUDA graph capture and across streams). The passes run
    # wave by wave, each wave's samples small enough for its re-reads to hit L2; a wave
    # is a range of tiles (pid0 onwards) of the same tensors, so nothing is sliced and
    # nothing synchronises: a Python loop of launches, fixed by the shapes.
    iters, tiles, per_wave = sched.iters, sched.tiles, sched.samples_per_wave
    tiles_p2 = max(16, _pow2(tiles))
    work = torch.empty((2, batch, tiles), dtype=torch.float32, device=device)
    gpart, dpart = work[0], work[1]
    with _on_device(device):
        for first in range(0, batch, per_wave):
            grid = (min(per_wave, batch - first) * tiles,)
            pid0 = first * tiles
            if has_g:
                _l2_grad_sumsq_kernel[grid](gpart, grad, per_sample, tiles, pid0,
                                            BLOCK=block, ITERS=iters, **options)
            _l2_delta_sumsq_kernel[grid](dpart, x, x_nat, grad, gpart, a_t, a, per_sample, tiles, pid0,
                                         HAS_GRAD=has_g, HAS_ALPHA_T=has_a,
                                         BLOCK=block, ITERS=iters, TILES_P2=tiles_p2, **options)
            _l2_apply_kernel[grid](out, x, x_nat, grad, gpart, dpart, a_t, a, e_t, e, lower, upper,
                                   per_sample, tiles, pid0,
                                   HAS_GRAD=has_g, HAS_ALPHA_T=has_a, HAS_EPS_T=has_e,
                                   BLOCK=block, ITERS=iters, TILES_P2=tiles_p2, **options)


# =================================================================== backend
def _interpreted() -> bool:
    """True if this module's kernels run in Triton's CPU interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of other triton versions
        return os.environ.get("TRITON_INTERPRET") == "1"
    return isinstance(_linf_kernel, InterpretedFunction)


class TritonBackend:
    name = "triton"

    def __init__(self):
        self._status: Optional[Union[bool, str]] = None

    def status(self) -> Union[bool, str]:
        if self._status is None:
            if _interpreted() or torch.cuda.is_available():
                self._status = True
            else:
                self._status = ("no CUDA GPU, and TRITON_INTERPRET=1 was not set before triton "
                                "was imported (needed to run the kernels on the CPU)")
        return self._status

    def supports(self, device: torch.device) -> Union[bool, str]:
        device = torch.device(device)
        if device.type == "cuda":
            return True if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if _interpreted():
                return True
            return "Triton runs on the CPU only under TRITON_INTERPRET=1 (set before importing triton)"
        return f"Triton kernels here run on CUDA devices, not {device.type!r}"

    def linf_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper):
        launch_linf(out, x_adv, x_nat, grad, alpha, eps, lower, upper)

    def l2_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper):
        launch_l2(out, x_adv, x_nat, grad, alpha, eps, lower, upper)

    def linf_project(self, out, x, x_nat, eps, lower, upper):
        launch_linf(out, x, x_nat, None, 0.0, eps, lower, upper)

    def l2_project(self, out, x, x_nat, eps, lower, upper):
        launch_l2(out, x, x_nat, None, 0.0, eps, lower, upper)


backend = TritonBackend()
