"""Independent Bernoulli sampling of atoms, the random part of ATOMO's estimate (Section 2, eq. (2))."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atomo_core.probabilities import SegmentLayout


def bernoulli_sample(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices i (ascending, int64) with t_i = 1, where t_i ~ Bernoulli(p_i) independently.

    Nothing is redrawn when no atom is selected: an empty sample is a legitimate outcome of eq. (2),
    and conditioning on a non-empty one would bias the estimate. Atoms with p_i = 1 are always selected
    and atoms with p_i = 0 never (uniforms lie in [0, 1)). A generator makes the draw reproducible; the
    uniforms are drawn on the generator's device and the indices returned on the probabilities' device.
    """
    device = generator.device if generator is not None else probabilities.device
    uniforms = torch.rand(probabilities.shape, generator=generator, device=device, dtype=torch.float32)
    selected = uniforms.to(probabilities.device) < probabilities
    return torch.nonzero(selected).reshape(-1)


@dataclass
class SegmentSample:
    """The sample of every layer of a `SegmentLayout`, drawn at once (`sample_segments`).

    index[l]: layer l's selected atoms (ascending int64, on the probabilities' device, relative to the
    layer). host_index[l], host_lam[l], host_p[l]: the same indices and the selected atoms' coefficients and
    probabilities (float64) as numpy arrays, from the one copy to the host. extra: the `extra` flags copied
    with them. uniforms: the flat draw (so that a layer whose p is replaced can be resampled with it).
    """

    index: list[torch.Tensor]
    host_index: list[np.ndarray]
    host_lam: list[np.ndarray]
    host_p: list[np.ndarray]
    extra: list[bool]
    uniforms: torch.Tensor


def sample_segments(
    p: torch.Tensor,
    lam: torch.Tensor,
    layout: SegmentLayout,
    budgets: Sequence[float],
    generator: torch.Generator | None = None,
    extra: torch.Tensor | None = None,
) -> SegmentSample:
    """t_i ~ Bernoulli(p_i) independently for every atom of every layer (eq. (2)), with ONE host sync.

    `p` and `lam` are flat vectors of `layout` (`segment_probabilities`), `budgets` the layers' s. One uniform
    draw over the flat `p` (the layout's, padding included: p = 0 there), then the selected
    positions by `torch.nonzero_static` into a buffer sized by a bound on the sample size that the host knows
    in advance: the expected size, sum p = sum_l min(s_l, nnz_l), is at most E = sum_l min(s_l, n_l); the
    buffer holds
    E + 10 sqrt(E) + 32 (Bernstein's inequality puts the chance of a larger sample below 1e-20; should it
    happen, a second nonzero over the whole mask gives it exactly). The positions, the sample size, the
    selected coefficients `lam` and probabilities `p` (float64 bits) and the `extra` flags (bool) go to the
    host in one copy; the host splits them per layer with the layout's offsets, and slices the device's
    positions with those host counts (no further sync). As in `bernoulli_sample`: uniforms lie in [0, 1)
    and are drawn on the generator's device; nothing is redrawn for an empty sample.
    """
    device = generator.device if generator is not None else p.device
    uniforms = torch.rand(p.shape, generator=generator, device=device, dtype=torch.float32).to(p.device)
    selected = uniforms < p
    expected = sum(min(s, n) for s, n in zip(budgets, layout.lengths, strict=True))
    bound = min(layout.total, math.ceil(expected + 10 * math.sqrt(expected) + 32))
    positions = torch.nonzero_static(selected, size=bound, fill_value=layout.total).reshape(-1)
    gather = positions.clamp(max=max(layout.total - 1, 0))
    extra = torch.zeros(0, dtype=torch.bool, device=p.device) if extra is None else extra.reshape(-1)
    payload = torch.cat(
        [
            positions,
            selected.sum(dtype=torch.int64).reshape(1),
            lam[gather].to(torch.float64).view(torch.int64) if layout.total else positions.new_zeros(0),
            p[gather].to(torch.float64).view(torch.int64) if layout.total else positions.new_zeros(0),
            extra.to(torch.int64),
        ]
    )
    host = payload.cpu().numpy()  # the one host sync
    size = int(host[bound])
    host_positions = host[:bound]
    host_lam = host[bound + 1 : 2 * bound + 1].view(np.float64)
    host_p = host[2 * bound + 1 : 3 * bound + 1].view(np.float64)
    flags = [bool(v) for v in host[3 * bound + 1 :]]
    if size > bound:  # beyond the bound (chance below 1e-20): the whole mask, exactly
        positions = torch.nonzero(selected).reshape(-1)
        both = torch.cat([lam[positions].to(torch.float64), p[positions].to(torch.float64)]).cpu().numpy()
        host_positions, host_lam, host_p = positions.cpu().numpy(), both[:size], both[size:]
    host_positions, host_lam, host_p = host_positions[:size], host_lam[:size], host_p[:size]
    starts = np.searchsorted(host_positions, layout.offsets)
    ends = np.searchsorted(host_positions, [o + n for o, n in zip(layout.offsets, layout.lengths, strict=True)])
    index, host_index, lams, ps = [], [], [], []
    for start, end, offset in zip(starts.tolist(), ends.tolist(), layout.offsets, strict=True):
        index.append(positions[start:end] - offset)
        host_index.append(host_positions[start:end] - offset)
        lams.append(host_lam[start:end])
        ps.append(host_p[start:end])
    return SegmentSample(index, host_index, lams, ps, flags, uniforms)
