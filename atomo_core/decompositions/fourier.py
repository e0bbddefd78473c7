"""Fourier ATOMO: the orthonormal DCT-II basis of the flattened tensor, computed through the FFT.

The DCT-II is a real orthonormal transform, so its basis vectors are unit-norm orthogonal atoms and
Lemma 1 applies: E||g^||^2 = sum_i lam_i^2 / p_i. Both directions cost O(n log n) (Makhoul's reordering,
one complex FFT of length n); no n x n matrix is formed.
"""

from __future__ import annotations

import math

import torch

from atomo_core.codecs import register_codec
from atomo_core.decompositions.base import AtomicCodec
from atomo_core.decompositions.basis import OrthonormalBasisDecomposition
from atomo_core.wire import CODEC_IDS


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II of a 1-D real tensor (scipy.fft.dct(x, norm="ortho"))."""
    n = x.numel()
    if n == 0:
        return x.clone()
    v = torch.cat([x[0::2], x[1::2].flip(0)])  # even entries, then odd entries reversed
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    y = (torch.fft.fft(v) * twiddle).real * math.sqrt(2.0 / n)
    y[0] = y[0] / math.sqrt(2.0)
    return y


def idct(y: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct` (the orthonormal DCT-III)."""
    n = y.numel()
    if n == 0:
        return y.clone()
    z = y * math.sqrt(n / 2.0)
    z[0] = z[0] * math.sqrt(2.0)
    k = torch.arange(n, device=y.device, dtype=y.dtype)
    mirrored = torch.cat([z.new_zeros(1), z[1:].flip(0)])  # y_{n-k}, with y_n = 0
    spectrum = torch.complex(z, -mirrored) * torch.polar(torch.ones_like(k), math.pi * k / (2 * n))
    v = torch.fft.ifft(spectrum).real
    x = torch.empty_like(y)
    half = (n + 1) // 2
    x[0::2] = v[:half]
    x[1::2] = v[half:].flip(0)
    return x


class FourierDecomposition(OrthonormalBasisDecomposition):
    """Atoms: the DCT-II basis vectors of the flattened tensor; coefficients: its DCT-II."""

    def analysis(self, flat):
        return dct(flat)

    def synthesis(self, lam):
        return idct(lam)


@register_codec
class FourierCodec(AtomicCodec):
    """Fourier (DCT-II) ATOMO: `budget` coefficients kept in expectation, `atom_dtype` of the clipped ones."""

    name = "fourier"
    codec_id = CODEC_IDS["fourier"]
    decomposition_type = FourierDecomposition

    def __init__(self, budget: float, atom_dtype: str = "float32"):
        super().__init__(budget, atom_dtype=atom_dtype)
