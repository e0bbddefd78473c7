"""Spectral ATOMO (Section 5): sparsify an orthogonal rank-one decomposition of the reshaped gradient.

The tensor is viewed as a matrix X (R x C). Let n = min(R, C) and work with Y = X or X^T (n x m, n <= m).
For any orthonormal basis u_1..u_n of R^n, Y = sum_i u_i (Y^T u_i)^T exactly, an orthogonal decomposition
with atoms u_i v_i^T, v_i = Y^T u_i / lam_i, lam_i = ||Y^T u_i||. Taking u from the eigenvectors of the
small Gram matrix Y Y^T makes it the SVD (lam = singular values) up to the eigensolver's accuracy. The
probabilities use lam_i = sqrt(eigenvalue_i) (floored so that every p_i > 0); each sent atom's right factor
Y^T u_i is computed from Y itself, never as Y^T u / sigma, so the estimate is exactly unbiased and its second
moment is sum_i ||Y^T u_i||^2 / p_i (Lemma 1) whatever the eigensolver's accuracy.

Reshapes: "rows" views a weight [out, in, *k] as [out, in * prod(k)]; "paper" follows the paper's
experiments, [out * in / 2, 2 * prod(k)] for convolutions with a kernel larger than 1x1 and an even
out * in, and "rows" otherwise (1x1 convolutions stay [out, in]). 1-D tensors are one row [1, n].

Sections, for k selected atoms: weights lam_i / p_i (float32, k), the atoms' factors along X's rows
(atom_dtype, k x R) and along X's columns (atom_dtype, k x C), both unit-norm. The estimate is
A^T diag(w) B, one matmul. With atom_dtype="float16" the atoms are rounded: the estimate is then unbiased
for sum_i lam_i u~_i v~_i^T, the gradient rebuilt from the rounded atoms (bench/codecs.py measures it).
"""

from __future__ import annotations

import torch

from atomo_core.codecs import register_codec
from atomo_core.decompositions.base import (
    ATOM_DTYPES,
    AtomicCodec,
    AtomicDecomposition,
    atom_dtype_code,
    atom_dtype_name,
    check_finite,
    meta,
    section_counts,
)
from atomo_core.wire import CODEC_IDS, WireFormatError

RESHAPES = {"rows": 0, "paper": 1}


def matrix_shape(shape: tuple[int, ...], reshape: str) -> tuple[int, int]:
    """The (R, C) matrix view of a tensor of `shape` under the `reshape` rule."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    out, rest = shape[0], shape[1:]
    columns = 1
    for d in rest:
        columns *= d
    kernel = columns // rest[0] if rest[0] else 0
    if reshape == "paper" and len(shape) > 2 and kernel > 1 and (out * rest[0]) % 2 == 0:
        return out * rest[0] // 2, 2 * kernel
    return out, columns


def _gram_eigen(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (r) and orthonormal eigenvectors (columns, n x r) of Y Y^T over Y's r non-zero rows.

    Zero rows (dead ReLU units) carry no atom: dropping them is exact, shrinks the problem, and avoids
    LAPACK's fp32 eigensolver failing (no convergence, or NaN) on such rank-deficient Gram matrices, as it
    did on LeNet-5 and MLP gradients late in training. The Gram matrix is formed from Y / max|Y| (same
    eigenvectors, better scaled; the eigenvalues are scaled back). Should fp32 still fail, it is retried in
    float64 (on CUDA, float64 is used from the start: it is faster there): any orthonormal basis keeps the
    decomposition exact, so this changes which basis, never unbiasedness.
    """
    rows = torch.nonzero(y.abs().amax(dim=1) > 0).squeeze(1)
    u = torch.zeros(y.shape[0], rows.numel(), dtype=y.dtype, device=y.device)
    if rows.numel() == 0:
        return torch.zeros(0, dtype=y.dtype, device=y.device), u
    nonzero = y[rows]
    peak = nonzero.abs().max()
    nonzero = nonzero / peak
    # On CUDA it is solved in float64 from the start: cuSOLVER's float64 eigensolver took 41 ms for
    # ResNet-18's 21 Gram matrices on an H200, its float32 one 93 ms (and float64 is the more accurate).
    solved = False
    if not nonzero.is_cuda:
        try:
            eigenvalues, basis = torch.linalg.eigh(nonzero @ nonzero.T)
            solved = bool(torch.isfinite(basis).all() and torch.isfinite(eigenvalues).all())
        except torch.linalg.LinAlgError:
            solved = False
    if not solved:
        wide = nonzero.to(torch.float64)
        eigenvalues, basis = (t.to(y.dtype) for t in torch.linalg.eigh(wide @ wide.T))
    u[rows] = basis
    return eigenvalues * peak**2, u


class SpectralDecomposition(AtomicDecomposition):
    """Atoms u_i v_i^T of the reshaped tensor from the Gram matrix's eigenvectors; see the module docstring."""

    def __init__(self, reshape: str = "rows", atom_dtype: str = "float32"):
        if reshape not in RESHAPES:
            raise ValueError(f"reshape must be one of {sorted(RESHAPES)}, got {reshape!r}")
        atom_dtype_code(atom_dtype)
        self.reshape = reshape
        self.atom_dtype = atom_dtype

    def wire_params(self):
        return (float(RESHAPES[self.reshape]), atom_dtype_code(self.atom_dtype))

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 2:
            raise WireFormatError(f"svd: expected 2 decomposition parameters (reshape, atom dtype), got {len(params)}")
        names = [name for name, code in RESHAPES.items() if code == params[0]]
        if not names:
            raise WireFormatError(f"svd: unknown reshape code {params[0]}")
        return cls(names[0], atom_dtype_name(params[1]))

    def decompose(self, tensor):
        rows, columns = matrix_shape(tuple(tensor.shape), self.reshape)
        x = tensor.reshape(rows, columns)
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
        transposed = rows > columns
        y = x.T if transposed else x  # n x m with n <= m
        eigenvalues, u = _gram_eigen(y)  # orthonormal u_i (columns), the left singular vectors
        # lam_i = ||Y^T u_i|| = sqrt(u_i^T Y Y^T u_i), the square root of u_i's eigenvalue: no m x n product
        # for the probabilities. Eigenvalues within rounding of zero are floored at eps * the largest, so
        # that every atom whose coefficient may be non-zero keeps p_i > 0 and the estimate stays exactly
        # unbiased; the atoms sent are rebuilt from Y itself in `pack`.
        floor = torch.finfo(eigenvalues.dtype).eps * eigenvalues.max() if eigenvalues.numel() else 0.0
        lam = eigenvalues.clamp(min=floor).sqrt()
        return lam, (y, u, transposed)

    def pack(self, state, index, lam, p):
        y, u, transposed = state
        left = u[:, index].T  # k x n, unit rows
        right = (y.T @ u[:, index]).T  # k x m: row k is Y^T u_k = lam_k v_k, from Y itself (never Y^T u / sigma)
        norms = torch.linalg.vector_norm(right, dim=1)
        v = right / norms.clamp(min=torch.finfo(right.dtype).tiny).unsqueeze(1)  # unit rows (0 for a null atom)
        row_factors, column_factors = (v, left) if transposed else (left, v)
        dtype = ATOM_DTYPES[self.atom_dtype]
        return [(norms / p).to(torch.float32), row_factors.to(dtype), column_factors.to(dtype)]

    def _factors(self, sections, shape):
        rows, columns = matrix_shape(shape, self.reshape)
        dtype = ATOM_DTYPES[self.atom_dtype]
        k, n_row, n_column = section_counts(sections, [torch.float32, dtype, dtype], "svd")
        if k > min(rows, columns):
            raise WireFormatError(f"svd: {k} atoms but a {rows} x {columns} matrix has at most {min(rows, columns)}")
        if n_row != k * rows or n_column != k * columns:
            raise WireFormatError(
                f"svd: {k} atoms of a {rows} x {columns} matrix need {k * rows} and {k * columns} factor entries, "
                f"got {n_row} and {n_column}"
            )
        weights, row_factors, column_factors = sections
        check_finite(weights, "svd: weights")
        check_finite(row_factors, "svd: row factors")
        check_finite(column_factors, "svd: column factors")
        return weights, row_factors.reshape(k, rows), column_factors.reshape(k, columns), rows, columns

    def unpack(self, sections, shape):
        weights, a, b, rows, columns = self._factors(sections, shape)
        estimate = torch.zeros(rows, columns, dtype=torch.float32, device=b.device)
        estimate.addmm_(a.T.to(torch.float32) * weights, b.to(torch.float32))
        return estimate.reshape(shape)

    def unpack_add_(self, sections, out, alpha):
        if not out.is_contiguous():
            return super().unpack_add_(sections, out, alpha)
        weights, a, b, rows, columns = self._factors(sections, tuple(out.shape))
        device, dtype = out.device, out.dtype
        scaled = a.T.to(device=device, dtype=dtype) * weights.to(device=device, dtype=dtype)
        out.view(rows, columns).addmm_(scaled, b.to(device=device, dtype=dtype), alpha=alpha)  # one matmul
        return out

    def expected_sections(self, shape, atoms):
        rows, columns = matrix_shape(shape, self.reshape)
        atoms = min(atoms, rows, columns)
        dtype = ATOM_DTYPES[self.atom_dtype]
        return [meta(atoms, torch.float32), meta(atoms * rows, dtype), meta(atoms * columns, dtype)]


@register_codec
class SpectralCodec(AtomicCodec):
    """Spectral ATOMO: `budget` rank-one atoms in expectation, `reshape` "rows" or "paper", `atom_dtype`."""

    name = "svd"
    codec_id = CODEC_IDS["svd"]
    decomposition_type = SpectralDecomposition

    def __init__(self, budget: float, reshape: str = "rows", atom_dtype: str = "float32"):
        super().__init__(budget, reshape=reshape, atom_dtype=atom_dtype)
