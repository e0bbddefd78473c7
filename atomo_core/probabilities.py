"""Algorithm 1 (Section 3): the sampling probabilities that minimize the variance of ATOMO's estimate.

Problem (3): minimize sum_i lam_i^2 / p_i subject to 0 < p_i <= 1 and sum_i p_i = s. Its solution
(Appendix B, KKT conditions (14)) is p_i = min(1, c |lam_i|) for the one scale c > 0 at which the
probabilities sum to s. Algorithm 1 finds c by sorting; here c is found without a sort, by Newton's method
on the concave, piecewise-linear f(c) = sum_i min(1, c |lam_i|) - s, which is exactly the update

    c <- (s - |C|) / sum_{i not in C} |lam_i|,   C = {i : c |lam_i| >= 1}  (the clipped atoms, p_i = 1).

Started from Lemma 2's c = s / ||lam||_1 it only grows, so the clipped set only grows and the iteration
stops at the fixed point after at most |C| + 1 < s + 1 passes of O(n) each. Inputs that need many passes
(long geometric tails of large coefficients) are finished with Algorithm 1's scan over the few largest
coefficients only (the candidates above a bound on 1/c, or a top-k; never a full sort). Sums are built by
additions only, never as total - prefix: float32 partial sums over short blocks of non-negative terms,
accumulated in float64.
"""

from __future__ import annotations

import math

import torch

# Newton passes before finishing with Algorithm 1's scan over the top coefficients.
_MAX_NEWTON_PASSES = 16


def check_budget(budget: float) -> float:
    """The sparsity budget s of problem (3) as a float; ValueError unless finite and > 0."""
    try:
        s = float(budget)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sparsity budget must be a number, got {budget!r}") from exc
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"sparsity budget must be finite and > 0, got {budget!r}")
    return s


def atomic_probabilities(lam: torch.Tensor, budget: float) -> torch.Tensor:
    """Algorithm 1: p solving problem (3) for the coefficients `lam` (1-D, any sign and order).

    Returns p with lam's shape and dtype: 0 <= p <= 1, p_i = 0 exactly where lam_i = 0, and
    sum(p) = min(budget, number of non-zero lam_i) (Appendix B, consequences 1 and 2).
    """
    s = check_budget(budget)
    if lam.dim() != 1:
        raise ValueError(f"coefficients must be 1-D, got shape {tuple(lam.shape)}")
    if not lam.is_floating_point():
        raise ValueError(f"coefficients must be floating point, got {lam.dtype}")
    work = lam.detach().abs()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    if not bool(torch.isfinite(work).all()):
        raise ValueError("coefficients must be finite (the gradient has NaN or infinite entries)")
    nnz = int(torch.count_nonzero(work))
    if s >= nnz:  # every non-zero atom is kept with certainty
        return (work > 0).to(lam.dtype)
    p = (work * _scale(work, s)).clamp_(max=1.0).to(lam.dtype)
    if int(torch.count_nonzero(p)) != nnz:  # c |lam_i| underflowed the dtype: keep p_i > 0 as (3) requires
        p[(p == 0) & (lam != 0)] = torch.finfo(lam.dtype).tiny
    return p


def _scale(a: torch.Tensor, s: float) -> float:
    """The c of p_i = min(1, c a_i) with sum_i p_i = s, for a >= 0 with more than s non-zeros."""
    c = s / _sum64(a)  # Lemma 2: optimal when nothing is clipped
    clipped, unclipped_sum, threshold = 0, 0.0, 0.0
    unclipped_part = torch.empty_like(a)
    for _ in range(_MAX_NEWTON_PASSES):
        threshold = 1.0 / c
        unclipped = a < threshold
        count = a.numel() - int(torch.count_nonzero(unclipped))
        if count == clipped:
            return c
        if count >= s:  # fewer than s atoms are clipped at the optimum: only rounding gets here; scan instead
            unclipped_sum = 0.0
            break
        clipped = count
        unclipped_sum = _sum64(torch.mul(a, unclipped, out=unclipped_part))
        c = (s - clipped) / unclipped_sum
    # Bound c from above: at most m = ceil(s) - 1 atoms are clipped at the optimum, and each atom not
    # clipped at the last threshold is below it, so the optimum's unclipped sum is at least floor_sum.
    m = math.ceil(s) - 1
    floor_sum = unclipped_sum - (m - clipped) * threshold
    candidates = a >= floor_sum / s if floor_sum > 0 else None
    if candidates is not None and int(torch.count_nonzero(candidates)) <= 4 * m + 4096:
        top = torch.sort(a[candidates], descending=True).values
        rest_sum = _sum64(torch.mul(a, ~candidates, out=unclipped_part))
    else:
        top, index = torch.topk(a, m, sorted=True)
        unclipped_part.copy_(a)[index] = 0.0
        rest_sum = _sum64(unclipped_part)
    return _scan(top, rest_sum, s)


def _scan(top: torch.Tensor, rest_sum: float, s: float) -> float:
    """Algorithm 1 on the largest coefficients `top` (sorted, descending), the others summing to `rest_sum`."""
    top = top.to(torch.float64)
    # tail[i] = sum_{j >= i} |lam_j| over all coefficients, built by additions only.
    tail = torch.flip(torch.cumsum(torch.flip(top, [0]), 0), [0]) + rest_sum
    remaining = s - torch.arange(top.numel(), dtype=torch.float64, device=top.device)  # s after i clips
    # The first i with |lam_i| s_i <= sum_{j >= i} |lam_j| starts the unclipped tail.
    fits = top * remaining <= tail
    i = int(torch.argmax(fits.to(torch.uint8))) if bool(fits.any()) else top.numel()
    return (s - i) / (float(tail[i]) if i < top.numel() else rest_sum)


def _sum64(a: torch.Tensor, block: int = 4096) -> float:
    """Sum of non-negative values: float32 partial sums of short blocks (no cancellation), added in float64."""
    if a.dtype == torch.float64 or a.numel() <= block:
        return float(a.sum(dtype=torch.float64))
    whole = a.numel() // block * block
    partial = a[:whole].view(-1, block).sum(1, dtype=a.dtype).to(torch.float64)
    return float(partial.sum() + a[whole:].sum(dtype=torch.float64))
