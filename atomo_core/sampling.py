"""Independent Bernoulli sampling of atoms, the random part of ATOMO's estimate (Section 2, eq. (2))."""

from __future__ import annotations

import torch


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
