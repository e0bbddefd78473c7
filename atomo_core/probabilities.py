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

`segment_probabilities` runs the same iteration for all layers of a model at once, on their device and
without a host synchronization (a fixed number of passes; `SegmentLayout` places the layers in one flat
vector); `AtomicCodec.encode_many` uses it with `atomo_core.sampling.sample_segments`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 for many layers at once, on the device, without a host synchronization.


class SegmentLayout:
    """Where L layers' coefficient vectors lie in one flat vector: layer l at `offsets[l]`, `lengths[l]` long.

    Every layer starts at a multiple of `block` and is padded with zeros to one, so that a block never holds
    two layers: per-layer sums are then sums of short blocks (float32 partial sums of non-negative terms, as
    in `atomic_probabilities`) added per layer in float64. `block` is 4096, or the longest layer where all
    are shorter (then the flat vector is a padded [L, n_max] matrix). Padding entries are zero coefficients:
    p = 0 there, so they are never sampled. Everything here is host metadata (Python ints).
    """

    def __init__(self, lengths: Sequence[int], block: int = 4096):
        self.lengths = tuple(int(n) for n in lengths)
        if any(n < 0 for n in self.lengths):
            raise ValueError(f"layer lengths must be >= 0, got {self.lengths}")
        self.block = max(1, min(block, max(self.lengths, default=1)))
        self.blocks = tuple(-(-n // self.block) for n in self.lengths)
        starts = [0]
        for count in self.blocks:
            starts.append(starts[-1] + count)
        self.offsets = tuple(start * self.block for start in starts[:-1])
        self.total = starts[-1] * self.block
        self._block_layer: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def block_layer(self, device: torch.device) -> torch.Tensor:
        """The layer of each block (int64, on `device`; copied there without waiting, once per device)."""
        device = torch.device(device)
        if device not in self._block_layer:
            host = torch.from_numpy(np.repeat(np.arange(len(self.lengths), dtype=np.int64), self.blocks))
            self._block_layer[device] = host.to(device, non_blocking=True)
        return self._block_layer[device]

    def flatten(self, values: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The 1-D `values` (one per layer, of `lengths`) in one zero-padded flat vector of `dtype`."""
        if len(values) != len(self.lengths):
            raise ValueError(f"{len(values)} coefficient vectors for a layout of {len(self.lengths)} layers")
        device = values[0].device if values else torch.device("cpu")
        flat = torch.zeros(self.total, dtype=dtype, device=device)
        for value, offset, n in zip(values, self.offsets, self.lengths, strict=True):
            if value.dim() != 1 or value.numel() != n:
                raise ValueError(f"coefficients must be 1-D of the layout's length {n}, got {tuple(value.shape)}")
            flat[offset : offset + n] = value
        return flat

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's part of a flat vector of this layout (views, padding dropped)."""
        return [flat[offset : offset + n] for offset, n in zip(self.offsets, self.lengths, strict=True)]


def segment_probabilities(
    flat: torch.Tensor, layout: SegmentLayout, budgets: Sequence[float], max_passes: int = _MAX_NEWTON_PASSES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 for every layer of `layout` at once: (p, flags), both on flat's device, no host sync.

    `flat` holds the layers' coefficients (`SegmentLayout.flatten`, float32 or float64), `budgets` the
    sparsity budget s of each layer (host floats). p (flat's dtype and layout) is, layer by layer, what
    `atomic_probabilities` returns: p_i = min(1, c |lam_i|) with sum p = s (Appendix B, eq. (14)), or p_i = 1
    on every non-zero where s >= nnz, and p_i > 0 exactly where lam_i != 0 (raised to the dtype's smallest
    normal number where c |lam_i| underflows).

    c is found by the same Newton iteration, vectorized over layers: a fixed number of passes (at most
    `max_passes`), each one count and one sum per layer (block sums, then index_add_ per layer), with no
    data-dependent branch on the host. Started from Lemma 2's c, the clipped set only grows and stays within
    the optimum's, which has at most ceil(s) - 1 atoms (|C*| >= s would make sum p > s), so ceil(s) - 1
    updates reach the fixed point: with budgets up to max_passes + 1 this is exact for every input. Larger
    budgets usually converge as fast; where a layer did not (a long geometric tail), flags says so. On the
    CPU the passes stop as soon as every layer is at its fixed point (a flag read there is no sync).

    flags (bool, L + 1): flags[0] is whether every coefficient is finite, flags[1 + l] whether layer l's
    iteration reached its fixed point (p exact). The caller copies flags to the host with the sample (one
    synchronization per model), raises ValueError if flags[0] is false, and recomputes the layers flagged
    inexact with `atomic_probabilities` (`finish_probabilities`).
    """
    if flat.dim() != 1 or flat.numel() != layout.total:
        raise ValueError(f"flat coefficients must be 1-D of length {layout.total}, got {tuple(flat.shape)}")
    if flat.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"flat coefficients must be float32 or float64, got {flat.dtype}")
    budgets = [check_budget(s) for s in budgets]
    if len(budgets) != len(layout):
        raise ValueError(f"{len(budgets)} budgets for a layout of {len(layout)} layers")
    device, dtype, count = flat.device, flat.dtype, len(layout)
    a = flat.detach().abs().view(-1, layout.block)  # blocks x block; a block holds one layer
    block_layer = layout.block_layer(device)
    s = torch.tensor(budgets, dtype=torch.float64).to(device, non_blocking=True)

    def per_layer_sum(blocks: torch.Tensor) -> torch.Tensor:  # float64 sums of non-negative block sums
        partial = blocks.sum(1, dtype=dtype).to(torch.float64)
        return torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, block_layer, partial)

    def per_layer_count(blocks: torch.Tensor) -> torch.Tensor:
        partial = torch.count_nonzero(blocks, dim=1)
        return torch.zeros(count, dtype=torch.int64, device=device).index_add_(0, block_layer, partial)

    finite = torch.isfinite(a).all().reshape(1)
    nnz = per_layer_count(a)  # a >= 0
    certain = nnz <= s  # every non-zero atom is kept with certainty
    total = per_layer_sum(a)
    c = torch.where(certain, 1.0, s / torch.where(certain, 1.0, total))  # Lemma 2: optimal when nothing is clipped
    clipped = torch.zeros(count, dtype=torch.int64, device=device)
    done = certain.clone()
    failed = torch.zeros_like(done)
    passes = max(0, min(max_passes, math.ceil(max(budgets, default=1.0)) - 1))
    for step in range(passes + 1):
        above = a >= (1.0 / c).to(dtype)[block_layer].unsqueeze(1)  # the clipped atoms at this c
        now = per_layer_count(above)
        done |= now == clipped  # the fixed point: c is optimal
        failed |= ~done & (now >= s)  # only rounding gets here (atomic_probabilities then scans)
        # On the CPU, reading a flag is no synchronization (there is no device): stop once all layers are.
        if step == passes or (device.type == "cpu" and (done | failed).numpy().all()):
            break
        update = ~done & ~failed
        unclipped_sum = per_layer_sum(torch.where(above, 0.0, a))
        c = torch.where(update, (s - now) / torch.where(update, unclipped_sum, 1.0), c)
        clipped = torch.where(update, now, clipped)
    positive = a > 0
    p = (a * c.to(dtype)[block_layer].unsqueeze(1)).clamp_(max=1.0)
    p = torch.where(certain[block_layer].unsqueeze(1) & positive, 1.0, p)
    p = torch.where((p == 0) & positive, torch.finfo(dtype).tiny, p)  # c |lam_i| underflowed: keep p_i > 0
    return p.reshape(-1), torch.cat([finite, done & ~failed])


def finish_probabilities(
    p: list[torch.Tensor], lams: Sequence[torch.Tensor], budgets: Sequence[float], flags: Sequence[bool]
) -> list[int]:
    """After `segment_probabilities`, with its flags on the host: ValueError for non-finite coefficients, and
    p[l] replaced by `atomic_probabilities(lams[l], budgets[l])` for every layer l flagged inexact (a few host
    syncs, only then). Returns the layers replaced."""
    if not flags[0]:
        raise ValueError("coefficients must be finite (the gradient has NaN or infinite entries)")
    redone = [layer for layer, exact in enumerate(flags[1:]) if not exact]
    for layer in redone:
        p[layer] = atomic_probabilities(lams[layer], budgets[layer])
    return redone


def layer_probabilities(
    flat_p: torch.Tensor, layout: SegmentLayout, lams: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each layer's p from a flat `segment_probabilities` result, in its coefficients' dtype (p_i > 0 kept
    where lam_i != 0 when that dtype is narrower)."""
    out = []
    for part, lam in zip(layout.split(flat_p), lams, strict=True):
        if part.dtype != lam.dtype:
            part = part.to(lam.dtype)
            part = torch.where((part == 0) & (lam != 0), torch.finfo(lam.dtype).tiny, part)
        out.append(part)
    return out


def batched_atomic_probabilities(lams: Sequence[torch.Tensor], budget: float | Sequence[float]) -> list[torch.Tensor]:
    """`atomic_probabilities` for every layer of `lams` (1-D, on one device) by `segment_probabilities`, with
    one host sync for the flags. For checks and tools; the encoder folds that sync into its sample's."""
    budgets = [budget] * len(lams) if isinstance(budget, (int, float)) else list(budget)
    for lam in lams:
        if lam.dim() != 1 or not lam.is_floating_point():
            raise ValueError(f"coefficients must be 1-D floating point, got {tuple(lam.shape)} {lam.dtype}")
    layout = SegmentLayout([lam.numel() for lam in lams])
    flat = layout.flatten(lams, flat_dtype(lams))
    p, flags = segment_probabilities(flat, layout, budgets)
    p = layer_probabilities(p, layout, lams)
    finish_probabilities(p, lams, budgets, flags.tolist())
    return p


def flat_dtype(lams: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype in which `segment_probabilities` works on `lams`: float64 if any is float64, else float32."""
    return torch.float64 if any(lam.dtype == torch.float64 for lam in lams) else torch.float32
