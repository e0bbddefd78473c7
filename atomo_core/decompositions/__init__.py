"""Atomic decompositions: entry-wise, spectral (SVD) and Fourier (DCT-II), and the protocol a user implements."""
