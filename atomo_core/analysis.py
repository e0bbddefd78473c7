"""Measurements of codecs on real gradients: relative variance per byte, Theorem 6's condition, the spectrum.

- `relative_variance`: E||g^ - g||^2 / ||g||^2 of a whole model's gradient g (every layer through one
  `LayerPolicy`, as the runtime encodes it), estimated over independent encodings, with its standard error,
  the exact wire bytes (the messages' lengths) and the encode and decode times. For an unbiased codec this is
  the variance the paper's analysis bounds (Section 3); for a biased one (top-k, PowerSGD without their
  error feedback) it is the squared relative error of one compression.
- `atomic_variance` and `spectral_variance`: the closed form for ATOMO, Lemma 1 with orthonormal atoms,
  E||g^ - g||^2 = sum_i lam_i^2 / p_i - ||g||^2, with p from Algorithm 1.
- `theorem6_ratio`: (n + m) ||X||_*^2 / ||X||_{1,1}^2 for an n x m matrix; by Theorem 6 spectral ATOMO has
  the smaller variance at equal communication exactly when it is <= 1 (Section 4).
- `singular_values`: the spectrum of a layer's matrix view, as in Figure 1.

Spectra come from the eigenvalues of the smaller Gram matrix in float64 (docs: baselines, a full SVD of a
512 x 4608 layer costs ~300 ms; the float64 Gram route is as accurate for these norms and ~5x cheaper).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from atomo_core.codecs import decode
from atomo_core.decompositions.spectral import SpectralDecomposition, matrix_shape
from atomo_core.policy import LayerPolicy
from atomo_core.probabilities import atomic_probabilities


@dataclass(frozen=True)
class VarianceEstimate:
    """`relative_variance`'s result: one value per encoding (`errors`, `nbytes`, `encode_s`, `decode_s`)."""

    errors: tuple[float, ...]  # ||g^ - g||^2 / ||g||^2 of each encoding
    nbytes: tuple[int, ...]  # total wire bytes of each encoding (sum of the messages' lengths)
    encode_s: tuple[float, ...]  # seconds to encode the whole gradient
    decode_s: tuple[float, ...]  # seconds to decode every message
    messages: int  # messages per encoding (one per tensor)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def stderr(self) -> float:
        """The standard error of `mean`: sample standard deviation / sqrt(encodings); 0 for one encoding."""
        n = len(self.errors)
        return statistics.stdev(self.errors) / math.sqrt(n) if n > 1 else 0.0


def relative_variance(
    policy: LayerPolicy | Callable[[], LayerPolicy],
    gradient: Sequence[torch.Tensor],
    encodings: int,
    seed: int = 0,
) -> VarianceEstimate:
    """Encode `gradient` (one tensor per parameter) `encodings` times independently and measure each estimate.

    `policy` is a LayerPolicy, or a function returning a fresh one per encoding (for codecs that keep state
    between calls, such as a warm start, so that every encoding is a first compression). A LayerPolicy's
    error-feedback memory is reset before every encoding, so with a biased codec each encoding is one
    compression without memory either way (a LayerPolicy passed in ends with the memory of the last
    encoding). Encoding e draws
    from a generator seeded with `seed + e`. The relative error is summed over all layers, so it is the
    whole gradient's ||g^ - g||^2 / ||g||^2.
    """
    if encodings < 1:
        raise ValueError(f"encodings must be >= 1, got {encodings}")
    if not gradient:
        raise ValueError("the gradient has no tensors")
    g = [t.detach().to(torch.float32) for t in gradient]
    norm2 = sum(float(t.double().square().sum()) for t in g)
    if not (math.isfinite(norm2) and norm2 > 0):
        raise ValueError(f"the gradient's squared norm must be finite and > 0, got {norm2}")
    errors, nbytes, encode_s, decode_s = [], [], [], []
    for e in range(encodings):
        layer_policy = policy if isinstance(policy, LayerPolicy) else policy()
        layer_policy.reset_feedback()  # one compression without memory, whichever the argument
        generator = torch.Generator().manual_seed(seed + e)
        start = time.perf_counter()
        messages = layer_policy.encode(g, generator)
        encoded = time.perf_counter()
        estimates = [decode(bytes(m)) for m in messages]
        decode_s.append(time.perf_counter() - encoded)
        encode_s.append(encoded - start)
        nbytes.append(sum(len(m) for m in messages))
        error = sum(float((est.double() - t.double()).square().sum()) for est, t in zip(estimates, g, strict=True))
        errors.append(error / norm2)
    return VarianceEstimate(tuple(errors), tuple(nbytes), tuple(encode_s), tuple(decode_s), len(g))


def atomic_variance(lam: torch.Tensor, budget: float) -> float:
    """E||g^ - g||^2 = sum_i lam_i^2 / p_i - sum_i lam_i^2 for orthonormal atoms (Lemma 1), p from Algorithm 1."""
    lam = lam.detach().to(torch.float64)
    p = atomic_probabilities(lam, budget)
    kept = p > 0
    return float((lam[kept].square() / p[kept]).sum() - lam.square().sum())


def spectral_variance(tensor: torch.Tensor, budget: float, reshape: str = "rows") -> float:
    """The closed-form E||g^ - g||^2 of spectral ATOMO (codec "svd") on `tensor`: `atomic_variance` of the
    singular values of its `reshape` matrix view."""
    lam, _ = SpectralDecomposition(reshape).decompose(tensor.detach().to(torch.float64))
    return atomic_variance(lam, budget)


def matrix_view(tensor: torch.Tensor, reshape: str = "rows") -> torch.Tensor:
    """The matrix spectral ATOMO decomposes for `tensor` under `reshape` (spectral.matrix_shape)."""
    return tensor.detach().reshape(matrix_shape(tuple(tensor.shape), reshape))


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """The singular values of the 2-D `x`, descending, in float64 (min(n, m) of them)."""
    if x.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(x.shape)}")
    y = x.detach().to(torch.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    if y.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(y @ y.T)
    return eigenvalues.clamp(min=0).sqrt().flip(0)


def theorem6_ratio(x: torch.Tensor, sigma: torch.Tensor | None = None) -> float:
    """(n + m) ||X||_*^2 / ||X||_{1,1}^2 for the n x m matrix `x`: <= 1 exactly when spectral ATOMO with budget
    s / (n + m) has at most the variance of entry-wise ATOMO with budget s at the same communication
    (Theorem 6). By Lemma 7 it lies in [(n + m) / nm, n + m]. `sigma`: x's singular values, if known."""
    if x.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(x.shape)}")
    entrywise = float(x.detach().to(torch.float64).abs().sum())
    if entrywise == 0:
        raise ValueError("the matrix is zero: Theorem 6's ratio is undefined")
    nuclear = float((singular_values(x) if sigma is None else sigma).sum())
    n, m = x.shape
    return (n + m) * nuclear**2 / entrywise**2
