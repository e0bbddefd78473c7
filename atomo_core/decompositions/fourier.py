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
    half = torch.fft.rfft(v)  # V_k for k <= n/2; V_{n-k} = conj(V_k) since v is real
    rest = n - half.numel()
    real = torch.cat([half.real, half.real[1 : rest + 1].flip(0)])
    imag = torch.cat([half.imag, -half.imag[1 : rest + 1].flip(0)])
    cos, sin = _twiddles(n, x)
    y = (real * cos + imag * sin) * math.sqrt(2.0 / n)  # Re(V_k exp(-i pi k / 2n))
    y[0] = y[0] / math.sqrt(2.0)
    return y


def idct(y: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct` (the orthonormal DCT-III)."""
    n = y.numel()
    if n == 0:
        return y.clone()
    z = y * math.sqrt(n / 2.0)
    z[0] = z[0] * math.sqrt(2.0)
    m = n // 2 + 1
    cos, sin = _twiddles(m, y, n)
    mirrored = torch.cat([z.new_zeros(1), z.flip(0)[: m - 1]])  # z_{n-k} for k < m, with z_n = 0
    head = z[:m]
    # V_k = exp(i pi k / 2n) (z_k - i z_{n-k}) for k <= n/2; the rest follow by Hermitian symmetry.
    spectrum = torch.complex(head * cos + mirrored * sin, head * sin - mirrored * cos)
    v = torch.fft.irfft(spectrum, n)
    x = torch.empty_like(y)
    x[0::2] = v[: (n + 1) // 2]
    x[1::2] = v[(n + 1) // 2 :].flip(0)
    return x


def _twiddles(count: int, like: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pi k / 2n for k < count."""
    angle = torch.arange(count, device=like.device, dtype=like.dtype) * (math.pi / (2 * (n or count)))
    return torch.cos(angle), torch.sin(angle)


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
