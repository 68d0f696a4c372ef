"""Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter 2019).

The smoothed classifier g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), is robust
within radius σ·Φ⁻¹(p_A) around x when the top class has probability p_A ≥ 1/2.
``certify`` estimates a one-sided Clopper-Pearson lower bound of p_A from Monte
Carlo samples (n0 to pick the class, n to bound its probability) and returns the
class and radius, or abstains; ``predict`` is the paper's PREDICT (a binomial test
between the two top classes). The binomial tail sums are exact (log-space, float64),
with no SciPy needed.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..attacks.base import (check_channels, int_arg, mean_std, model_context, model_input_dtype, module_of,
                            nonneg_numbers, number_arg)

__all__ = ["ABSTAIN", "sample_counts", "binom_upper_tail", "clopper_pearson_lower",
           "binom_test_two_sided", "certify", "predict", "certified_accuracy"]

ABSTAIN = -1


def _log_binom_pmf(k: Tensor, n: Tensor, p: Tensor) -> Tensor:
    k, n, p = k.double(), n.double(), p.double()
    return (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
            + k * torch.log(p.clamp_min(1e-300)) + (n - k) * torch.log1p(-p).clamp_min(-1e300))


def binom_upper_tail(k: Tensor, n: Tensor, p: Tensor) -> Tensor:
    """P(X ≥ k) for X ~ Binomial(n, p), elementwise over equal-shaped 1-D tensors (float64)."""
    k, n, p = (torch.as_tensor(v, dtype=torch.float64) for v in (k, n, p))
    k, n, p = torch.broadcast_tensors(k, n, p)
    out = torch.empty(k.shape, dtype=torch.float64)
    for i in range(k.numel()):
        ki, ni, pi = int(k.view(-1)[i]), int(n.view(-1)[i]), float(p.view(-1)[i])
        if ki <= 0:
            out.view(-1)[i] = 1.0
            continue
        if ki > ni:
            out.view(-1)[i] = 0.0
            continue
        if pi <= 0.0:
            out.view(-1)[i] = 0.0
            continue
        if pi >= 1.0:
            out.view(-1)[i] = 1.0
            continue
        j = torch.arange(ki, ni + 1, dtype=torch.float64)
        lp = _log_binom_pmf(j, torch.tensor(float(ni), dtype=torch.float64),
                            torch.tensor(pi, dtype=torch.float64))
        out.view(-1)[i] = torch.logsumexp(lp, 0).exp().clamp(max=1.0)
    return out


def clopper_pearson_lower(k: Tensor, n: int, alpha: float, iters: int = 60,
                          use_scipy: bool = True) -> Tensor:
    """The one-sided (1 − α) Clopper-Pearson lower confidence bound on a binomial proportion
    with ``k`` successes of ``n``: the p with P(X ≥ k | p) = α (0 when k = 0), i.e. the
    α quantile of Beta(k, n − k + 1). SciPy's beta quantile when it is installed, else
    bisection on the exact binomial tail."""
    k = torch.as_tensor(k, dtype=torch.float64).reshape(-1)
    if use_scipy:
        try:
            from scipy.stats import beta as _beta
            kn = k.numpy()
            q = _beta.ppf(alpha, kn.clip(min=1), n - kn + 1)
            return torch.where(k > 0, torch.from_numpy(q).double(), torch.zeros_like(k))
        except ImportError:
            pass
    lo = torch.zeros_like(k)
    hi = (k / max(n, 1)).clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        tail = binom_upper_tail(k, torch.full_like(k, float(n)), mid)
        # the tail grows with p: too small a tail means p is below the bound
        lo = torch.where(tail < alpha, mid, lo)
        hi = torch.where(tail < alpha, hi, mid)
    return torch.where(k > 0, lo, torch.zeros_like(lo))


def binom_test_two_sided(k: Tensor, n: Tensor) -> Tensor:
    """The exact two-sided binomial test p-value of k successes in n against p = 1/2."""
    k = torch.as_tensor(k, dtype=torch.float64).reshape(-1)
    n = torch.as_tensor(n, dtype=torch.float64).reshape(-1).expand_as(k)
    hi = torch.maximum(k, n - k)
    tail = binom_upper_tail(hi, n, torch.full_like(k, 0.5))
    p = 2 * tail
    # k = n/2 exactly: the whole distribution counts
    p = torch.where(2 * hi == n, torch.ones_like(p), p)
    return p.clamp(max=1.0)


# ------------------------------------------------------------ validation
def check_sigma(sigma, name: str = "sigma") -> float:
    """``sigma`` as a float: finite and > 0, else a ValueError/TypeError naming ``name``."""
    s = number_arg(name, sigma)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{name}: expected a finite noise level > 0, got {sigma}")
    return s


def check_alpha(alpha, name: str = "alpha") -> float:
    a = number_arg(name, alpha)
    if not 0 < a < 1:  # NaN fails too
        raise ValueError(f"{name}: expected a confidence level in (0, 1), got {alpha}")
    return a


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected a point [C, H, W] / [D] or a batch [B, ...], got a scalar")


def _check_logits(z, rows: int) -> None:
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != rows:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"model: expected logits of shape [batch, classes] = [{rows}, C], got {got}")


# --------------------------------------------------------------- sampling
@torch.no_grad()
def sample_counts(model, x: Tensor, sigma: float, num: int, batch_size: int = 1000,
                  generator: Optional[torch.Generator] = None, n_classes: Optional[int] = None) -> Tensor:
    """For each point in ``x`` ([B, ...]) the class counts of f(x + δ) over ``num`` Gaussian
    samples of std ``sigma``: [B, C] int64. Noise comes from ``generator`` (never the
    global RNG); at most ``batch_size`` rows go through the model at once. The model
    sees the noisy input as is (put any normalisation inside the model). Non-finite
    logits raise: argmax would silently count them as class 0."""
    sigma = check_sigma(sigma)
    num = int_arg("num", num, 1)
    batch_size = int_arg("batch_size", batch_size, 1)
    b = x.shape[0]
    in_dtype = _input_dtype(model, x)
    per_point = max(1, min(num, batch_size))           # noise samples per point per forward
    pts_per = max(1, batch_size // per_point)          # points per forward
    counts = None if n_classes is None else torch.zeros(b, n_classes, dtype=torch.long, device=x.device)
    finite = torch.ones((), dtype=torch.bool, device=x.device)  # checked once at the end: no sync per batch
    for s in range(0, b, pts_per):
        xs = x[s:s + pts_per]
        m = xs.shape[0]
        left = num
        while left > 0:
            k = min(left, per_point)
            rep = xs.repeat_interleave(k, 0)
            noise = torch.randn(rep.shape, generator=generator, device=rep.device, dtype=rep.dtype)
            z = model((rep + noise * sigma).to(in_dtype))
            _check_logits(z, rep.shape[0])
            finite &= torch.isfinite(z).all().to(finite.device)
            if counts is None:
                counts = torch.zeros(b, z.shape[1], dtype=torch.long, device=x.device)
            pred = z.argmax(1).reshape(m, k).to(counts.device)
            counts[s:s + m].scatter_add_(1, pred, torch.ones_like(pred))
            left -= k
    if not bool(finite):
        raise ValueError("model: returned non-finite logits (NaN or inf) on the noisy inputs; "
                         "the smoothed prediction would be meaningless")
    if counts is None:
        counts = torch.zeros(b, 0, dtype=torch.long, device=x.device)
    return counts


def _input_dtype(model, x: Tensor) -> torch.dtype:
    """What the model is fed: its own dtype (float64/bf16/fp16 weights), float32 for a
    float32 module whatever x's dtype, and x's own dtype for a callable that is not a
    module (its weights are out of sight)."""
    dt = model_input_dtype(model)
    if dt is not None:
        return dt
    return torch.float32 if module_of(model) is not None else x.dtype


def _batch_and_generator(x: Tensor, seed: Optional[int]) -> Tuple[bool, Tensor, torch.Generator]:
    """(one point given?, x as a batch, the noise generator: seeded, or fresh entropy)."""
    _check_x(x)
    if seed is not None:
        seed = int_arg("seed", seed, -math.inf)
    single = x.dim() in (1, 3)
    xb = x.unsqueeze(0) if single else x
    gen = torch.Generator(device=xb.device)
    if seed is not None:
        gen.manual_seed(int(seed))
    else:
        gen.seed()
    return single, xb, gen


def _ctx(model, x):
    return model_context(model, "eval", x.device)


def _with_normalization(model, normalization, x: Tensor):
    """``model`` seeing ``(t - mean) / std`` per channel: the noise stays in pixel space."""
    if normalization is None:
        return model
    if not isinstance(normalization, (tuple, list)) or len(normalization) != 2:
        raise TypeError("normalization: expected a pair (mean, std)")
    mean, std = mean_std(normalization[0], normalization[1], x.dtype, prefix="normalization: ")
    mean, std = mean.to(x.device), std.to(x.device)
    check_channels(x, mean.numel())
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, std = mean.reshape(shape), std.reshape(shape)
    in_dtype = _input_dtype(model, x)
    return lambda t: model(((t - mean) / std).to(in_dtype))


def certify(model, x: Tensor, sigma: float, n0: int = 100, n: int = 100000, alpha: float = 0.001,
            batch_size: int = 1000, seed: Optional[int] = 0, normalization=None) -> Tuple[Tensor, Tensor]:
    """CERTIFY (Cohen et al. 2019, Alg. 1) for each point of ``x`` ([B, ...] or one point).

    Returns (prediction [B] int64, ``ABSTAIN`` = −1 where it abstains; radius [B] float64,
    σ·Φ⁻¹(p_A lower bound), 0 where it abstains). With probability ≥ 1 − α per point the
    smoothed classifier predicts the returned class everywhere within the radius. An
    empty batch gives empty results. ``normalization=(mean, std)``: the model expects
    normalized input (σ and the radius stay in the pixel space of ``x``)."""
    sigma = check_sigma(sigma)
    alpha = check_alpha(alpha)
    n0, n = int_arg("n0", n0, 1), int_arg("n", n, 1)
    batch_size = int_arg("batch_size", batch_size, 1)
    single, xb, gen = _batch_and_generator(x, seed)
    f = _with_normalization(model, normalization, xb)
    if xb.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    with _ctx(model, xb):
        c0 = sample_counts(f, xb, sigma, n0, batch_size, gen)
        c_a = c0.argmax(1)
        counts = sample_counts(f, xb, sigma, n, batch_size, gen, n_classes=c0.shape[1])
    n_a = counts.gather(1, c_a[:, None]).squeeze(1).cpu()
    p_lower = clopper_pearson_lower(n_a, n, alpha)
    ok = p_lower > 0.5
    radius = torch.where(ok, sigma * torch.special.ndtri(p_lower.clamp(1e-12, 1 - 1e-12)),
                         torch.zeros_like(p_lower))
    pred = torch.where(ok, c_a.cpu(), torch.full_like(c_a.cpu(), ABSTAIN))
    if single:
        return pred[0], radius[0]
    return pred, radius


def predict(model, x: Tensor, sigma: float, n: int = 100000, alpha: float = 0.001,
            batch_size: int = 1000, seed: Optional[int] = 0, normalization=None) -> Tensor:
    """PREDICT (Cohen et al. 2019): the top class of n noisy samples if a two-sided
    binomial test against the runner-up rejects at level α, else ``ABSTAIN``
    (``normalization`` as in ``certify``)."""
    sigma = check_sigma(sigma)
    alpha = check_alpha(alpha)
    n = int_arg("n", n, 1)
    batch_size = int_arg("batch_size", batch_size, 1)
    single, xb, gen = _batch_and_generator(x, seed)
    f = _with_normalization(model, normalization, xb)
    if xb.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    with _ctx(model, xb):
        counts = sample_counts(f, xb, sigma, n, batch_size, gen).cpu()
    top2 = counts.topk(min(2, counts.shape[1]), dim=1)
    n_a = top2.values[:, 0]
    n_b = top2.values[:, 1] if counts.shape[1] > 1 else torch.zeros_like(n_a)
    pval = binom_test_two_sided(n_a, n_a + n_b)
    pred = torch.where(pval <= alpha, top2.indices[:, 0], torch.full_like(n_a, ABSTAIN))
    return pred[0] if single else pred


def certified_accuracy(pred: Tensor, radius: Tensor, y: Tensor, radii: Sequence[float]) -> Dict[str, List[float]]:
    """The fraction of points certified correct at each radius r: pred = y and radius ≥ r
    (``pred``, ``radius``, ``y``: [B] each, as ``certify`` returns them)."""
    for name, t in (("pred", pred), ("radius", radius), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if pred.dim() != 1:
        raise ValueError(f"pred: expected shape [B], got {tuple(pred.shape)}")
    for name, t in (("radius", radius), ("y", y)):
        if t.shape != pred.shape:
            raise ValueError(f"{name}: expected shape {list(pred.shape)} like pred, got {list(t.shape)}")
    rs = nonneg_numbers("radii", radii)
    y = y.to(pred.device)
    radius = radius.to(pred.device)
    ok = pred == y
    accs = [(ok & (radius >= r)).float().mean().item() if len(y) else float("nan") for r in rs]
    return {"radius": rs, "certified_accuracy": accs}
