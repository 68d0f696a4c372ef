"""Success tests with a float-rounding margin for the attacks that walk up to the boundary.

Minimum-norm attacks (EAD, FMN, SparseFool, JSMA) end on points whose top two logits differ by
a few units in the last place; another memory layout or convolution algorithm (the user's
own forward on NCHW, the attack's on channels_last) can flip such a tie. A point counts as
adversarial here only when it wins by more than that rounding, so the flag an attack
reports holds for any forward of the same model.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["margin", "clear_success", "ROUNDING"]

# relative size of a logit's float32 rounding across layouts and algorithms (measured ~2e-7
# of the largest logit on the MNIST CNN, NCHW against NHWC); 50x that is the margin asked for
ROUNDING = 1e-5


def margin(z: Tensor, lab: Tensor, targeted: bool) -> Tensor:
    """How far the point is into the adversarial side: max_{j≠y} z_j − z_y (untargeted,
    ``lab`` = y) or z_t − max_{j≠t} z_j (targeted, ``lab`` = t). > 0: adversarial."""
    z_l = z.gather(1, lab[:, None]).squeeze(1)
    z_o = z.scatter(1, lab[:, None], -math.inf).amax(1)
    return z_l - z_o if targeted else z_o - z_l


def clear_success(z: Tensor, lab: Tensor, targeted: bool, kappa: float = 0.0) -> Tensor:
    """[N] bool: adversarial by more than ``kappa`` plus the rounding margin
    (``ROUNDING`` × the row's largest |logit|, at least ``ROUNDING``); never on logits that
    are not finite."""
    z = z.float()
    finite = torch.isfinite(z).all(1)
    tol = ROUNDING * z.abs().amax(1).nan_to_num(0.0, posinf=0.0).clamp_min(1.0)
    return (margin(z, lab, targeted) > kappa + tol) & finite
