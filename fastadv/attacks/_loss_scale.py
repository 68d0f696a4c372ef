"""Dynamic per-sample loss scaling for input gradients taken through an fp16 autocast model.

fp16 has five exponent bits: its smallest subnormal is 2^-24 (6e-8). The cross-entropy
gradient of a sample classified with a logit margin of 30 is ~e^-30 (1e-13) at the logits,
so a fixed loss scale (1024 was used before) leaves it 0 in fp16: ``sign(0) = 0`` moves
nothing, and a batch of confident samples looked like a model whose output does not
depend on x. float32 has 8 exponent bits and keeps it.

So the gradient is taken in two parts. The loss is computed on float32 logits; its gradient
w.r.t. them (``gz``, float32, exact) is taken first. Each sample's row of ``gz`` is then
multiplied by a power of two ``s`` that brings its largest entry to ``|T|`` (the sample's
*scale target*), backpropagated through the fp16 network, and the input gradient is divided
by the same ``s`` (exact: a power of two). Whatever the margin, the fp16 backward starts from
entries of about ``|T|``.

``T`` is per sample and dynamic: it starts at ``INIT`` (2^10, the old fixed scale's bound,
so nothing overflows that did not before); after a finite pass whose input gradient peaked
below ``GROW_BELOW`` it doubles (x16 when the input gradient came back all zero), up to
``MAX`` (underflow is the risk there); on overflow (a non-finite input-gradient entry) it is
quartered, down to ``MIN``, and marked (negative sign) so that it never grows again in that
run: a sample that grew into an overflow would otherwise overflow every few steps. A pass
with ``retries`` (a CPU pass, where a host sync is free) redoes the backward at once for the
samples that overflowed or underflowed, so their step is not lost; elsewhere (CUDA: no host
sync in the loop, graph capture) they move nothing this step and the next step uses the new
scale.

Rows coupled by the model (BatchNorm in training mode) cannot take one scale each: the input
gradient of a row then mixes every row's upstream gradient, and per-row unscaling would weigh
those terms wrongly. They share one scale, the one that brings the batch's largest logit
gradient to the smallest ``|T|``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["INIT", "MAX", "MIN", "GROW_BELOW", "new_state", "rows_of", "fold_rows", "scaled_input_grad"]

INIT = 2.0 ** 10
MAX = 2.0 ** 14        # the upstream gradient's peak; fp16's largest finite value is ~2^16
MIN = 2.0 ** -14
GROW_BELOW = 2.0 ** 4  # grow while the scaled input gradient peaks below this
_EXP = 100             # |log2 s| at most: s and 1/s stay normal float32 numbers


def new_state(n: int, device) -> Tensor:
    """A fresh per-sample scale state: ``[n]`` float32, every ``T`` at ``INIT``."""
    return torch.full((n,), INIT, dtype=torch.float32, device=device)


def rows_of(shared: Tensor, n: int) -> Tensor:
    """Per-row targets for a pass of ``n`` rows from a running target ``shared`` (``[1]``): what
    a caller that keeps no per-row state (the batch changes between passes) starts from."""
    return shared.expand(n).clone()


def fold_rows(shared: Tensor, rows: Tensor) -> None:
    """Fold a pass's per-row targets back into the running ``shared`` in place (no host sync):
    the lowest of them, backed off (negative) if any row backed off."""
    if rows.numel():
        low = rows.abs().amin()
        shared.copy_(torch.where((rows < 0).any(), -low, low))


def _scales(t: Tensor, m: Tensor, independent: bool) -> Tensor:
    """Per row, the power of two that brings the peak ``m`` of its logit gradient to at most
    ``|t|`` (one for all rows when they are coupled). A zero row gets 2^_EXP: it stays zero."""
    if independent:
        ratio = t.abs() / m
    else:
        ratio = (t.abs().amin() / m.amax()).expand(m.shape)
    return torch.exp2(torch.floor(torch.log2(ratio)).clamp_(-_EXP, _EXP))


def scaled_input_grad(z: Tensor, zf: Tensor, loss: Tensor, x: Tensor, state: Optional[Tensor] = None,
                      *, independent: bool = True, retries: int = 0) -> Optional[Tensor]:
    """The float32 gradient of ``loss.sum()`` w.r.t. ``x`` through an fp16 graph, loss-scaled
    per sample (see the module's docstring); None when ``x`` gets no gradient.

    ``z``: the model's output (any dtype) on ``x``; ``zf``: ``z.float()``, from which ``loss``
    (per row, or already summed) was computed. ``state``: the ``[B]`` scale targets, updated
    in place (None: fresh ones at ``INIT``, not kept). ``independent``: rows do not interact
    in the model. ``retries``: backward passes allowed for rows that overflowed or underflowed
    (each is a host sync; the graph is then kept until the last one). A row whose gradient
    is still non-finite comes back all zero."""
    n = x.shape[0]
    t = state if state is not None else new_state(n, x.device)
    if n == 0:
        (g,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
        return g
    (gz,) = torch.autograd.grad(loss.sum(), zf, allow_unused=True)  # stops at zf: z's graph stays
    if gz is None:  # the loss does not use the logits: nothing flows back to x
        gz = torch.zeros_like(zf)
    gz = gz.reshape(n, -1)
    # a non-finite logit gradient cannot be scaled: such a row moves nothing
    gz = torch.where(torch.isfinite(gz).all(1, keepdim=True), gz, 0.0)
    m = gz.abs().amax(1) if gz.shape[1] else gz.new_zeros(n)

    def backward(s: Tensor, rows: Optional[Tensor], keep: bool) -> Optional[Tensor]:
        w = s if rows is None else s * rows
        u = (gz * w[:, None]).reshape(zf.shape).to(z.dtype)
        (g,) = torch.autograd.grad(z, x, grad_outputs=u, retain_graph=keep, allow_unused=True)
        return g

    s = _scales(t, m, independent)
    g = backward(s, None, retries > 0)
    if g is None:
        return None
    g = g.float()
    peak = g.flatten(1).abs().amax(1)  # NaN or inf where any entry is: one pass for both
    fin = torch.isfinite(peak)
    for k in range(retries):
        over = ~fin
        if independent:
            under = fin & (peak == 0) & (m > 0) & (t > 0) & (t < MAX)
            need = over | under
        else:  # one scale for all: only an overflow is worth a retry (it backs every row off)
            under = torch.zeros_like(fin)
            need = over.any().expand(n)
        if not bool(need.any()):   # the host sync a retry costs
            break
        if independent:
            t.copy_(torch.where(over, _backed_off(t), torch.where(under, (t * 16).clamp(max=MAX), t)))
        else:
            t.copy_(_backed_off(t.amin()).expand(n))
        s2 = _scales(t, m, independent)
        g2 = backward(s2, need.float() if independent else None, k + 1 < retries).float()
        rows = need.view((-1,) + (1,) * (g.dim() - 1))
        g = torch.where(rows, g2, g)
        s = torch.where(need, s2, s)
        peak = torch.where(need, g2.flatten(1).abs().amax(1), peak)
        fin = torch.isfinite(peak)
    # the scale targets of the next pass; a row with no logit gradient learnt nothing
    if independent:
        grow = fin & (t > 0) & (m > 0) & (peak < GROW_BELOW)
        factor = torch.where(peak == 0, 16.0, 2.0)
        t.copy_(torch.where(~fin, _backed_off(t), torch.where(grow, (t * factor).clamp(max=MAX), t)))
    else:
        low = t.amin()   # the rows share one (negative once it backed off: the smallest)
        grow = fin.all() & (low > 0) & (m.amax() > 0) & (peak.amax() < GROW_BELOW)
        t.copy_(torch.where(fin.all(), torch.where(grow, (low * 2).clamp(max=MAX), low),
                            _backed_off(low)).expand(n))
    g = g * s.reciprocal().view((-1,) + (1,) * (g.dim() - 1))
    return torch.where(fin.view((-1,) + (1,) * (g.dim() - 1)), g, 0.0)


def _backed_off(t: Tensor) -> Tensor:
    """A quarter of ``|t|`` (at least ``MIN``), negative: backed off, never to grow again."""
    return -(t.abs() * 0.25).clamp(min=MIN)
