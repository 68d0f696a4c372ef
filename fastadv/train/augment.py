"""Invertible random crop + flip, so ATTA's per-sample perturbation cache stays aligned.

``RandomCropFlip`` augments a batch on the trainer's side with parameters it keeps;
``apply`` moves any image-shaped tensor (the input, a cached perturbation) into the
augmented frame and ``invert_into`` moves an augmented-frame tensor back, writing
only the pixels the crop kept.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..attacks._groups import memory_format

__all__ = ["RandomCropFlip"]


class RandomCropFlip:
    """Zero-pad by ``padding``, crop back to the input size at a random offset, flip
    left-right with probability 1/2 (the CIFAR augmentation of the literature)."""

    def __init__(self, padding: int = 4, flip: bool = True):
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding: expected an int >= 0, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def sample(self, n: int, generator: torch.Generator, device) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-sample (row offset, column offset, flip) drawn from ``generator``."""
        p = self.padding
        gd = generator.device
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gd)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gd)
        fl = (torch.randint(0, 2, (n,), generator=generator, device=gd).bool() if self.flip
              else torch.zeros(n, dtype=torch.bool, device=gd))
        return oy.to(device), ox.to(device), fl.to(device)

    def _source_index(self, shape, params) -> Tuple[Tensor, Tensor]:
        """For each output pixel its flat source index in the input, and whether it exists."""
        _, _, h, w = shape
        oy, ox, fl = params
        p = self.padding
        rows = torch.arange(h, device=oy.device)
        cols = torch.arange(w, device=oy.device)
        src_r = rows[None, :, None] + (oy - p)[:, None, None]                    # [B, H, 1]
        c = torch.where(fl[:, None], (w - 1 - cols)[None, :], cols[None, :])     # [B, W]
        src_c = (c + (ox - p)[:, None])[:, None, :]                               # [B, 1, W]
        valid = (src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w)           # [B, H, W]
        flat = src_r.clamp(0, h - 1) * w + src_c.clamp(0, w - 1)
        return flat.reshape(len(oy), 1, h * w), valid.reshape(len(oy), 1, h * w)

    def apply(self, x: Tensor, params, fill: float = 0.0) -> Tensor:
        """``x`` [B, C, H, W] in the augmented frame (pixels from outside the image = ``fill``)."""
        if x.dim() != 4:
            raise ValueError(f"x: RandomCropFlip expects [B, C, H, W], got {tuple(x.shape)}")
        b, c, h, w = x.shape
        idx, valid = self._source_index(x.shape, params)
        out = x.reshape(b, c, h * w).gather(2, idx.expand(b, c, h * w))
        out = torch.where(valid, out, torch.full_like(out, fill))
        return out.reshape(b, c, h, w).contiguous(memory_format=memory_format(x))

    def invert_into(self, dst: Tensor, src: Tensor, params) -> Tensor:
        """Write augmented-frame ``src`` back into original-frame ``dst`` (in place) where
        the crop kept a pixel; pixels the crop dropped keep their value in ``dst``."""
        b, c, h, w = dst.shape
        idx, valid = self._source_index(dst.shape, params)
        # pixels that came from padding go to a scratch slot past the end
        idx = torch.where(valid, idx, torch.full_like(idx, h * w)).expand(b, c, h * w)
        canvas = torch.cat([dst.reshape(b, c, h * w), dst.new_zeros(b, c, 1)], dim=2)
        canvas.scatter_(2, idx, src.reshape(b, c, h * w).to(dst.dtype))
        dst.copy_(canvas[:, :, : h * w].reshape(b, c, h, w))
        return dst
