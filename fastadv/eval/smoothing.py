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

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..attacks.base import model_context

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


@torch.no_grad()
def sample_counts(model, x: Tensor, sigma: float, num: int, batch_size: int = 1000,
                  generator: Optional[torch.Generator] = None, n_classes: Optional[int] = None) -> Tensor:
    """For each point in ``x`` ([B, ...]) the class counts of f(x + δ) over ``num`` Gaussian
    samples of std ``sigma``: [B, C] int64. Noise comes from ``generator`` (never the
    global RNG); at most ``batch_size`` rows go through the model at once. The model
    sees the noisy input as is (put any normalisation inside the model)."""
    b = x.shape[0]
    per_point = max(1, min(num, batch_size))           # noise samples per point per forward
    pts_per = max(1, batch_size // per_point)          # points per forward
    counts = None if n_classes is None else torch.zeros(b, n_classes, dtype=torch.long, device=x.device)
    for s in range(0, b, pts_per):
        xs = x[s:s + pts_per]
        m = xs.shape[0]
        left = num
        while left > 0:
            k = min(left, per_point)
            rep = xs.repeat_interleave(k, 0)
            noise = torch.randn(rep.shape, generator=generator, device=rep.device, dtype=rep.dtype)
            z = model(rep + noise * sigma)
            if counts is None:
                counts = torch.zeros(b, z.shape[1], dtype=torch.long, device=x.device)
            pred = z.argmax(1).reshape(m, k)
            counts[s:s + m].scatter_add_(1, pred, torch.ones_like(pred))
            left -= k
    if counts is None:
        counts = torch.zeros(b, 0, dtype=torch.long, device=x.device)
    return counts


def _batch_and_generator(x: Tensor, seed: Optional[int]) -> Tuple[bool, Tensor, torch.Generator]:
    """(one point given?, x as a batch, the noise generator: seeded, or fresh entropy)."""
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



def certify(model, x: Tensor, sigma: float, n0: int = 100, n: int = 100000, alpha: float = 0.001,
            batch_size: int = 1000, seed: Optional[int] = 0) -> Tuple[Tensor, Tensor]:
    """CERTIFY (Cohen et al. 2019, Alg. 1) for each point of ``x`` ([B, ...] or one point).

    Returns (prediction [B] int64, ``ABSTAIN`` = −1 where it abstains; radius [B] float64,
    σ·Φ⁻¹(p_A lower bound), 0 where it abstains). With probability ≥ 1 − α per point the
    smoothed classifier predicts the returned class everywhere within the radius."""
    if sigma <= 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected in (0, 1), got {alpha}")
    single, xb, gen = _batch_and_generator(x, seed)
    with _ctx(model, xb):
        c0 = sample_counts(model, xb, sigma, n0, batch_size, gen)
        c_a = c0.argmax(1)
        counts = sample_counts(model, xb, sigma, n, batch_size, gen, n_classes=c0.shape[1])
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
            batch_size: int = 1000, seed: Optional[int] = 0) -> Tensor:
    """PREDICT (Cohen et al. 2019): the top class of n noisy samples if a two-sided
    binomial test against the runner-up rejects at level α, else ``ABSTAIN``."""
    single, xb, gen = _batch_and_generator(x, seed)
    with _ctx(model, xb):
        counts = sample_counts(model, xb, sigma, n, batch_size, gen).cpu()
    top2 = counts.topk(min(2, counts.shape[1]), dim=1)
    n_a = top2.values[:, 0]
    n_b = top2.values[:, 1] if counts.shape[1] > 1 else torch.zeros_like(n_a)
    pval = binom_test_two_sided(n_a, n_a + n_b)
    pred = torch.where(pval <= alpha, top2.indices[:, 0], torch.full_like(n_a, ABSTAIN))
    return pred[0] if single else pred


def certified_accuracy(pred: Tensor, radius: Tensor, y: Tensor, radii: Sequence[float]) -> Dict[str, List[float]]:
    """The fraction of points certified correct at each radius r: pred = y and radius ≥ r."""
    y = y.to(pred.device)
    ok = pred == y
    accs = [(ok & (radius >= r)).float().mean().item() if len(y) else float("nan") for r in radii]
    return {"radius": [float(r) for r in radii], "certified_accuracy": accs}
