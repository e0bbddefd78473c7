"""Atomic decompositions: entry-wise, spectral (SVD) and Fourier (DCT-II), and the protocol a user implements.

Importing this package registers the "entrywise", "svd" and "fourier" codecs.
"""

from atomo_core.decompositions.base import AtomicCodec, AtomicDecomposition
from atomo_core.decompositions.basis import OrthonormalBasisDecomposition
from atomo_core.decompositions.entrywise import EntrywiseCodec, EntrywiseDecomposition
from atomo_core.decompositions.fourier import FourierCodec, FourierDecomposition, dct, idct
from atomo_core.decompositions.spectral import SpectralCodec, SpectralDecomposition

__all__ = [
    "AtomicCodec",
    "AtomicDecomposition",
    "EntrywiseCodec",
    "EntrywiseDecomposition",
    "FourierCodec",
    "FourierDecomposition",
    "OrthonormalBasisDecomposition",
    "SpectralCodec",
    "SpectralDecomposition",
    "dct",
    "idct",
]
