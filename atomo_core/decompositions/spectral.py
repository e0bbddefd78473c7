"""Spectral ATOMO (Section 5): sparsify a rank-one decomposition of the reshaped gradient.

The tensor is viewed as a matrix X (R x C). Let n = min(R, C) and work with Y = X or X^T (n x m, n <= m).
Two bases ("basis" option):

"exact" (the codec's default). For any orthonormal basis u_1..u_n of R^n, Y = sum_i u_i (Y^T u_i)^T exactly, an
orthogonal decomposition with atoms u_i v_i^T, v_i = Y^T u_i / lam_i, lam_i = ||Y^T u_i||. Taking u from the
eigenvectors of the small Gram matrix Y Y^T makes it the SVD (lam = singular values) up to the eigensolver's
accuracy. The probabilities use lam_i = sqrt(eigenvalue_i) (floored so that every p_i > 0); each sent atom's
right factor Y^T u_i is computed from Y itself, never as Y^T u / sigma, so the estimate is unbiased for
sum_i u_i u_i^T Y, which is Y to the orthonormality of the eigenvectors (working precision), and its second
moment is sum_i ||Y^T u_i||^2 / p_i (Lemma 1) whatever the eigensolver's accuracy.

"warm": the top-r subspace from one subspace-iteration step warm-started at the
previous step's basis, and the residual's rows. With Q_prev (n x r) the previous step's Q for this layer
(the encoder's state, kept by `LayerPolicy`; at the first step, or without state, Q_prev = Y Omega for a
standard normal m x r Omega from the encoder's generator):

    B0 = Y^T Q_prev      (m x r; scaled by 1 / max|B0|, which changes no column space)
    Z  = Y B0            (n x r: one step of subspace iteration on Y Y^T)
    Q  = CholQR2(Z)      (two passes of shifted Cholesky QR in float64 on the r x r Gram matrix)
    B  = Y^T Q           (m x r)
    V  = the eigenvectors of B^T B (r x r, by descending eigenvalue); Q <- Q V, B <- B V (Rayleigh-Ritz)
    R  = Y - Q B^T       (n x m, the residual, one addmm)

The rotation V (`ritz_rotations`, one batched float64 eigh for all of a model's layers of one rank) changes no
subspace and no product Q B^T; it makes the top atoms the singular pairs of Y's projection on span(Q), whose
coefficients have the least sum over all bases of that subspace, which lowers Algorithm 1's variance (on a
trained ResNet-18's gradients, 1.64x -> 1.56x the exact route's at r = 32 and 1.32x -> 1.24x at r = 64).
Atoms: q_i b_i^T for i < r, with lam_i = ||q_i|| ||b_i||, and e_j R_j^T (row j of the residual) for the n
rows, with lam_{r+j} = ||R_j||; Algorithm 1 runs over all n + r. As computed, the sum of these atoms is
Q B^T + R with R the rounded Y - Q B^T, so it equals Y to the rounding of that one product and subtraction
(about (r + 2) u (|Y| + |Q| |B|^T) per entry, u = 2^-24 in float32), for ANY Q, orthonormal or not: the
estimate is unbiased for it whatever Q is, because every atom with a non-zero coefficient has p_i > 0
(Section 2, eq. (2) needs no orthogonality). The atoms are not mutually orthogonal (<q_i b_i^T, e_j R_j^T>_F =
q_i[j] <b_i, R_j>), but the Bernoulli draws are independent and centred, so the cross terms vanish in the
variance:

    E||g^ - Y||^2 = sum_i lam_i^2 (1 / p_i - 1),
    E||g^||^2     = sum_i lam_i^2 / p_i + sum_{i != k} <a_i, a_k>_F = sum_i lam_i^2 / p_i + ||Y||^2 - sum_i lam_i^2

(a_i = lam_i times the unit atom). With Q^T Q = I the cross terms sum to zero (R = (I - Q Q^T) Y is
orthogonal to Q's columns), sum_i lam_i^2 = ||Y||^2 and the second moment is Lemma 1's sum_i lam_i^2 / p_i;
Algorithm 1's probabilities minimize exactly this variance for the given atoms. The new Q is the state for
the next step (`encode_with_state`); decoding needs none of it. r = min(rank, n); a layer with n <= 2 r is
encoded by the exact route (its eigendecomposition is cheap and its message has the exact layout). On CUDA
the warm route's matmuls run in strict float32 (TF32 off while encoding: TF32 biased the top atoms' sum away
from Y by about 1e-3 relative).

Measured (bench/warm.py, ResNet-18, CPU, 2 threads, one run each): at initialization (a random batch of 32)
r = 32 encodes in 0.25x the exact route's time at 1.18x its variance for equal expected bytes (r = 16: 0.18x
and 1.19x; r = 64: 0.41x and 1.17x). On a trained ResNet-18's gradients (bench/warm.py --checkpoint, digits,
batch 16) no rank meets both 0.3x and 1.3x: r = 32 0.27x at 1.56x, r = 48 0.34x at 1.36x, r = 64 0.44x at
1.24x. The tracker is not what limits it: started from each layer's own top-r singular vectors the route
gives 1.44x at r = 32 and 1.19x at r = 64. A trained gradient's tail beyond r costs more as rows than as
singular vectors, and at the r its variance needs, the route's four n x m x r products (4 r n m
multiply-adds against the Gram matrix's n^2 m: half of it at n = 512, r = 64) come near 0.3x of the exact
encode on their own. ResNet-18 trained with the warm basis (bench/warm_accuracy.py, 3 seeds) reached the exact
basis's accuracy within noise (+3.4 points, standard error 2.7). It is not the default: the variance on
trained gradients and the GPU timings (not yet run) decide it (README, "The library").

Reshapes: "rows" views a weight [out, in, *k] as [out, in * prod(k)]; "paper" follows the paper's
experiments, [out * in / 2, 2 * prod(k)] for convolutions with a kernel larger than 1x1 and an even
out * in, and "rows" otherwise (1x1 convolutions stay [out, in]). 1-D tensors are one row [1, n].

Sections, exact layout, for k selected atoms: weights lam_i / p_i (float32, k), the atoms' factors along X's
rows (atom_dtype, k x R) and along X's columns (atom_dtype, k x C), both unit-norm. The estimate is
A^T diag(w) B, one matmul. Warm layout, for k1 selected top atoms and k2 selected residual rows: weights
(float32, k1 + k2: the top atoms', then the rows'), the top atoms' unit factors along X's rows (k1 x R) and
columns (k1 x C), the rows' indices j in Y (int32, k2, strictly increasing, < n) and the unit rows R_j /
||R_j|| (atom_dtype, k2 x m; rows of Y are columns of X when R > C). The header carries (budget, reshape,
atom dtype) for the exact basis and (budget, reshape, atom dtype, 1, rank) for the warm one. With
atom_dtype="float16" the atoms are rounded: the estimate is then unbiased for the gradient rebuilt from the
rounded atoms (bench/codecs.py measures it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from atomo_core.codecs import register_codec
from atomo_core.decompositions.base import (
    ATOM_DTYPES,
    AtomicCodec,
    AtomicDecomposition,
    atom_dtype_code,
    atom_dtype_name,
    check_finite,
    check_increasing_indices,
    meta,
    section_counts,
)
from atomo_core.wire import CODEC_IDS, WireFormatError

RESHAPES = {"rows": 0, "paper": 1}
BASES = {"exact": 0, "warm": 1}
DEFAULT_RANK = 32
MAX_RANK = 1024


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


def _gram_eigen(y: torch.Tensor, drop_zero_rows: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (r) and orthonormal eigenvectors (columns, n x r) of Y Y^T.

    Zero rows (dead ReLU units) carry no atom. Off CUDA (drop_zero_rows, the default there) they are
    dropped: exact, a smaller problem, and it avoids LAPACK's fp32 eigensolver failing (no convergence, or
    NaN) on such rank-deficient Gram matrices, as it did on LeNet-5 and MLP gradients late in training; r is
    the number of non-zero rows. Should fp32 still fail, it is retried in float64. Finding the rows is a
    host sync, so on CUDA (float64 from the start: cuSOLVER's float64 eigensolver took 41 ms for ResNet-18's
    21 Gram matrices on an H200, its float32 one 93 ms, and it is the more accurate) they are kept instead,
    with -1 put on the Gram matrix's diagonal at each: e_j is then an eigenvector with eigenvalue -1,
    separated from the others (>= 0), and its eigenvalue is returned as 0 (r = n; `decompose` floors it like
    any eigenvalue within rounding of zero, an atom of negligible coefficient). Either way the Gram matrix is
    formed from Y / max|Y| (same eigenvectors, better scaled; the eigenvalues are scaled back), and any
    orthonormal basis keeps the decomposition exact, so the choice changes which basis, never unbiasedness.
    """
    if drop_zero_rows is None:
        drop_zero_rows = not y.is_cuda
    if not drop_zero_rows:
        return _gram_eigen_batched([y])[0]
    rows = torch.nonzero(y.abs().amax(dim=1) > 0).squeeze(1)
    u = torch.zeros(y.shape[0], rows.numel(), dtype=y.dtype, device=y.device)
    if rows.numel() == 0:
        return torch.zeros(0, dtype=y.dtype, device=y.device), u
    nonzero = y[rows]
    peak = nonzero.abs().max()
    if not bool(torch.isfinite(peak)):  # an infinite entry (NaN rows were dropped above): nothing to solve, and
        # the eigensolver would fail on it; `decompose` makes the coefficients NaN, which Algorithm 1 refuses
        return torch.full((rows.numel(),), torch.nan, dtype=y.dtype, device=y.device), u
    nonzero = nonzero / peak
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


def batched_exact_route(y: torch.Tensor) -> bool:
    """Whether `decompose_many` solves this exact-route layer's Gram matrix in a batched float64 eigh with the
    others of its size (on CUDA), rather than by `_gram_eigen`'s per-layer float32 CPU route (bench/syncs.py
    replaces it to count the CUDA route's syncs on a CPU)."""
    return y.is_cuda


def _gram_eigen_batched(ys: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`_gram_eigen(y, drop_zero_rows=False)` for matrices with the same number of rows n, by one batched
    float64 `eigh` of their n x n Gram matrices (each formed from Y / max|Y|, -1 on the diagonal at a zero
    row; see `_gram_eigen`). A non-finite Gram matrix is replaced by zeros for the eigensolver, so that it
    cannot fail the other layers; that layer's eigenvalues come out NaN (scaled by its NaN peak)."""
    grams, peaks = [], []
    for y in ys:
        zero = y.abs().amax(dim=1) == 0
        peak = y.abs().amax().clamp(min=torch.finfo(y.dtype).tiny)
        wide = (y / peak).to(torch.float64)
        gram = wide @ wide.T
        gram.diagonal().sub_(zero.to(torch.float64))  # -1 at zero rows (their rows and columns are 0)
        grams.append(torch.where(torch.isfinite(gram).all(), gram, 0.0))
        peaks.append(peak)
    eigenvalues, bases = torch.linalg.eigh(torch.stack(grams))
    eigenvalues = torch.where(eigenvalues < -0.5, 0.0, eigenvalues)
    return [
        (e.to(y.dtype) * peak**2, u.to(y.dtype)) for e, u, peak, y in zip(eigenvalues, bases, peaks, ys, strict=True)
    ]


def ritz_rotations(bs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Rayleigh-Ritz rotations of warm bases of one rank r: for each B (m x r, B = Y^T Q), the r x r
    orthogonal V whose columns are the eigenvectors of B^T B by descending eigenvalue (one batched float64
    `eigh` for all of them).

    Q V and B V span what Q and B span and (Q V)(B V)^T = Q B^T, so the decomposition stays exact; with Q
    orthonormal the columns of B V are orthogonal, B V = Y^T Q V = U_B S_B (B's left singular vectors and
    singular values), and the top atoms' coefficients ||B V e_i|| are B's singular values: the best rank-one
    atoms within span(Q) (Section 5: the SVD's atoms). Their sum, the nuclear norm of B, is the least
    sum_i ||B W e_i|| over orthogonal W, and Algorithm 1's second moment grows with the coefficients' sum
    (Lemma 2, Theorem 4: it is (sum_i lam_i)^2 / s when no p_i is clipped at 1, more otherwise). Each Gram
    matrix is formed from B / max|B| (the eigenvectors do not change; no overflow). A non-finite B gets V = I
    (its coefficients are NaN and Algorithm 1 rejects them), and so do all of them where the eigensolver
    fails: V only makes the atoms better, never the estimate biased."""
    r = bs[0].shape[1]
    tiny = torch.finfo(torch.float32).tiny
    eye = torch.eye(r, dtype=torch.float64, device=bs[0].device)
    grams, finite = [], []
    for b in bs:
        scaled = b / b.abs().amax().clamp(min=tiny)
        gram = (scaled.T @ scaled).to(torch.float64)
        finite.append(torch.isfinite(gram).all())
        grams.append(torch.where(finite[-1], gram, eye))
    try:
        _, v = torch.linalg.eigh(torch.stack(grams))
    except torch.linalg.LinAlgError:
        return [eye.to(b.dtype) for b in bs]
    return [torch.where(ok, rotation.flip(-1), eye).to(b.dtype) for rotation, ok, b in zip(v, finite, bs, strict=True)]


@contextlib.contextmanager
def strict_float32(device: torch.device):
    """Matmuls on `device` in IEEE float32 inside the block: TF32 is switched off for CUDA and restored after.

    The flag is process-wide, so CUDA matmuls of other threads during the block run in float32 too (slower,
    never less accurate). Nothing changes on other devices.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def cholesky_qr2(z: torch.Tensor) -> torch.Tensor:
    """Q with the column space of Z (n x r) and Q^T Q = I, by shifted CholQR2 (to float32's rounding; about
    the second pass's shift, 1e-12 for small n r, in float64).

    Two passes of Q <- Q L^-T, L L^T = Q^T Q + shift I, in float64 (the r x r Gram matrix and the triangular
    solves are cheap). The shift, 11 (n r + r (r + 1)) u trace(Q^T Q) + tiny (Fukaya, Kannan, Nakatsukasa,
    Yamamoto, Yanagisawa, "Shifted Cholesky QR for computing the QR factorization of ill-conditioned
    matrices", SIAM J. Sci. Comput. 2020, with the Frobenius norm as the bound on the spectral norm), keeps
    the factorization positive definite for rank-deficient or zero Z, without a host synchronization; the
    second pass restores orthogonality. Any finite result serves the warm decomposition, which is exact for
    every Q.
    """
    n, r = z.shape
    q = z.to(torch.float64)
    eye = torch.eye(r, dtype=torch.float64, device=z.device)
    unit = torch.finfo(torch.float64).eps / 2
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(2):
        gram = q.T @ q
        shift = 11 * (n * r + r * (r + 1)) * unit * torch.trace(gram) + tiny
        factor, _ = torch.linalg.cholesky_ex(gram + shift * eye)
        q = torch.linalg.solve_triangular(factor, q.T, upper=False).T  # Q L^-T
    return q.to(z.dtype)


@dataclass
class _Exact:
    y: torch.Tensor
    u: torch.Tensor
    transposed: bool


@dataclass
class _Warm:
    q: torch.Tensor  # n x r
    b: torch.Tensor  # m x r
    residual: torch.Tensor  # n x m
    r: int
    transposed: bool


class SpectralDecomposition(AtomicDecomposition):
    """Rank-one atoms of the reshaped tensor, from the exact or the warm basis; see the module docstring."""

    def __init__(
        self, reshape: str = "rows", atom_dtype: str = "float32", basis: str = "exact", rank: int = DEFAULT_RANK
    ):
        if reshape not in RESHAPES:
            raise ValueError(f"reshape must be one of {sorted(RESHAPES)}, got {reshape!r}")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {sorted(BASES)}, got {basis!r}")
        atom_dtype_code(atom_dtype)
        self.reshape = reshape
        self.atom_dtype = atom_dtype
        self.basis = basis
        whole = isinstance(rank, (int, float)) and not isinstance(rank, bool) and float(rank).is_integer()
        if not (whole and 1 <= rank <= MAX_RANK):
            raise ValueError(f"svd: rank must be a whole number in [1, {MAX_RANK}], got {rank!r}")
        self.rank = int(rank)

    def wire_params(self):
        common = (float(RESHAPES[self.reshape]), atom_dtype_code(self.atom_dtype))
        return common if self.basis == "exact" else (*common, float(BASES["warm"]), float(self.rank))

    @classmethod
    def from_wire_params(cls, params):
        if len(params) not in (2, 4):
            raise WireFormatError(
                f"svd: expected 2 decomposition parameters (reshape, atom dtype) or 4 (reshape, atom dtype, "
                f"basis, rank), got {len(params)}"
            )
        names = [name for name, code in RESHAPES.items() if code == params[0]]
        if not names:
            raise WireFormatError(f"svd: unknown reshape code {params[0]}")
        if len(params) == 2:
            return cls(names[0], atom_dtype_name(params[1]))
        if params[2] != BASES["warm"]:
            raise WireFormatError(f"svd: basis code {params[2]} with a rank (only the warm basis, 1, has one)")
        try:
            return cls(names[0], atom_dtype_name(params[1]), "warm", params[3])
        except ValueError as exc:
            raise WireFormatError(str(exc)) from exc

    def warm_rank(self, rows: int, columns: int) -> int:
        """r of the warm route for an R x C view, or 0 where the layer takes the exact route."""
        n = min(rows, columns)
        r = min(self.rank, n)
        return r if self.basis == "warm" and n > 2 * r else 0

    def decompose(self, tensor):
        lam, state, _ = self.decompose_with_state(tensor, None, None)
        return lam, state

    def _view(self, tensor):
        """(Y, transposed, r): the n x m view (n <= m) in float32 or float64, and the warm rank (0: exact)."""
        rows, columns = matrix_shape(tuple(tensor.shape), self.reshape)
        x = tensor.reshape(rows, columns)
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
        transposed = rows > columns
        return (x.T if transposed else x), transposed, self.warm_rank(rows, columns)

    def decompose_with_state(self, tensor, state, generator):
        """(lam, decomposition state, the next step's basis Q or None where the exact route ran)."""
        y, transposed, r = self._view(tensor)
        if r:
            with strict_float32(y.device):
                q, b = self._warm_subspace(y, r, state, generator)
                return self._warm_atoms(y, q, b, ritz_rotations([b])[0], transposed)
        return self._exact(y, _gram_eigen(y), transposed)

    def decompose_many(self, tensors, states, generator):
        """`decompose_with_state` for each tensor, with the small eigenproblems of all layers solved together:
        one batched `eigh` for the warm layers' r x r Rayleigh-Ritz matrices of each rank and, on CUDA, one
        per matrix size for the exact layers' Gram matrices (float64, zero rows at eigenvalue -1, as
        `_gram_eigen` does on CUDA). A CUDA `eigh` checks its status on the host, so this turns one host sync
        per layer into one per distinct size. On the CPU (syncs are free) the exact layers keep
        `_gram_eigen`'s float32 route. The results are the per-layer ones up to the eigensolver's rounding."""
        views = [self._view(t) for t in tensors]
        out: list = [None] * len(views)
        warm: dict[int, list] = {}
        exact: dict[int, list] = {}
        for i, ((y, transposed, r), state) in enumerate(zip(views, states, strict=True)):
            if r:
                with strict_float32(y.device):
                    warm.setdefault(r, []).append((i, *self._warm_subspace(y, r, state, generator)))
            elif batched_exact_route(y):
                exact.setdefault(y.shape[0], []).append(i)
            else:
                out[i] = self._exact(y, _gram_eigen(y), transposed)
        for group in warm.values():
            with strict_float32(group[0][1].device):
                rotations = ritz_rotations([b for _, _, b in group])
                for (i, q, b), v in zip(group, rotations, strict=True):
                    out[i] = self._warm_atoms(views[i][0], q, b, v, views[i][1])
        for group in exact.values():
            for i, eigen in zip(group, _gram_eigen_batched([views[i][0] for i in group]), strict=True):
                out[i] = self._exact(views[i][0], eigen, views[i][1])
        return out

    def _exact(self, y, eigen, transposed):
        eigenvalues, u = eigen  # orthonormal u_i (columns), the left singular vectors
        # lam_i = ||Y^T u_i|| = sqrt(u_i^T Y Y^T u_i), the square root of u_i's eigenvalue: no m x n product
        # for the probabilities. Eigenvalues within rounding of zero are floored at eps * the largest, so
        # that every atom whose coefficient may be non-zero keeps p_i > 0 and the estimate stays exactly
        # unbiased; the atoms sent are rebuilt from Y itself in `pack`.
        floor = torch.finfo(eigenvalues.dtype).eps * eigenvalues.max() if eigenvalues.numel() else 0.0
        lam = eigenvalues.clamp(min=floor).sqrt()
        # A non-finite entry must fail Algorithm 1's check (the CPU route drops a row whose max is NaN as if it
        # were zero): made NaN on the device, without a host sync.
        lam = torch.where(torch.isfinite(y).all(), lam, torch.nan)
        return lam, _Exact(y, u, transposed), None

    def _warm_subspace(self, y, r, previous, generator):
        """(Q, B = Y^T Q): one subspace-iteration step from the previous basis (or from Y Omega)."""
        n, m = y.shape
        if previous is None:
            device = generator.device if generator is not None else y.device
            omega = torch.randn(m, r, generator=generator, device=device, dtype=y.dtype).to(y.device)
            previous = y @ omega
        elif tuple(previous.shape) != (n, r):
            raise ValueError(
                f"svd: warm basis of shape {tuple(previous.shape)}, this layer needs {(n, r)} (a new model or "
                "rank needs a new policy state)"
            )
        else:
            previous = previous.to(device=y.device, dtype=y.dtype)
        start = y.T @ previous  # B0 = Y^T Q_prev
        start = start / start.abs().amax().clamp(min=torch.finfo(y.dtype).tiny)  # scale only: no overflow in Z
        q = cholesky_qr2(y @ start)  # Q = CholQR2(Y B0)
        return q, y.T @ q  # B = Y^T Q

    def _warm_atoms(self, y, q, b, v, transposed):
        """The warm atoms after the Rayleigh-Ritz rotation V: Q V, B V, R = Y - (Q V)(B V)^T, lam."""
        q, b = q @ v, b @ v
        residual = torch.addmm(y, q, b.T, alpha=-1.0)  # R = Y - Q B^T
        lam = torch.cat(
            [
                torch.linalg.vector_norm(q, dim=0) * torch.linalg.vector_norm(b, dim=0),
                torch.linalg.vector_norm(residual, dim=1),
            ]
        )
        return lam, _Warm(q, b, residual, q.shape[1], transposed), q

    def pack(self, state, index, lam, p):
        dtype = ATOM_DTYPES[self.atom_dtype]
        tiny = torch.finfo(torch.float32).tiny
        if isinstance(state, _Exact):
            y, u, transposed = state.y, state.u, state.transposed
            left = u[:, index].T  # k x n, unit rows
            right = (y.T @ u[:, index]).T  # k x m: row k is Y^T u_k = lam_k v_k, from Y (never Y^T u / sigma)
            norms = torch.linalg.vector_norm(right, dim=1)
            v = right / norms.clamp(min=tiny).unsqueeze(1)  # unit rows (0 for a null atom)
            row_factors, column_factors = (v, left) if transposed else (left, v)
            return [(norms / p).to(torch.float32), row_factors.to(dtype), column_factors.to(dtype)]
        return self._pack_warm(state, index, lam, p, int(torch.count_nonzero(index < state.r)))

    def pack_selected(self, state, index, lam, p, host_index, host_lam, host_p):
        """`pack`, reading the warm layout's number of selected top atoms from the host's copy of the indices
        (no host sync; `pack` counts them on the device)."""
        if isinstance(state, _Exact):
            return self.pack(state, index, lam, p)
        return self._pack_warm(state, index, lam, p, int(np.count_nonzero(host_index < state.r)))

    def _pack_warm(self, state, index, lam, p, top):
        """The warm layout's sections; `top` selected atoms (index is ascending: they come first) are top atoms."""
        dtype = ATOM_DTYPES[self.atom_dtype]
        tiny = torch.finfo(torch.float32).tiny
        left, right = state.q[:, index[:top]].T, state.b[:, index[:top]].T  # k1 x n, k1 x m
        left = left / torch.linalg.vector_norm(left, dim=1, keepdim=True).clamp(min=tiny)
        right = right / torch.linalg.vector_norm(right, dim=1, keepdim=True).clamp(min=tiny)
        rows = index[top:] - state.r
        residual_rows = state.residual[rows]
        residual_rows = residual_rows / lam[top:].unsqueeze(1).clamp(min=tiny)
        row_factors, column_factors = (right, left) if state.transposed else (left, right)
        return [
            (lam / p).to(torch.float32),
            row_factors.to(dtype),
            column_factors.to(dtype),
            rows.to(torch.int32),
            residual_rows.to(dtype),
        ]

    def _sections(self, sections, shape):
        """Validated (weights, A, B, row indices, rows, R, C, transposed): the estimate is A^T diag(w) B plus
        the weighted rows added at the indexed rows of Y (columns of X when transposed)."""
        rows, columns = matrix_shape(shape, self.reshape)
        n, m = min(rows, columns), max(rows, columns)
        dtype = ATOM_DTYPES[self.atom_dtype]
        r = self.warm_rank(rows, columns)
        if r:
            n_weights, n_row, n_column, k2, n_rows = section_counts(
                sections, [torch.float32, dtype, dtype, torch.int32, dtype], "svd (warm)"
            )
            k = n_weights - k2
            if k < 0 or k > r or k2 > n:
                raise WireFormatError(
                    f"svd (warm): {n_weights} weights for {k2} residual rows; a {rows} x {columns} matrix has at "
                    f"most {r} top atoms and {n} rows"
                )
            if n_rows != k2 * m:
                raise WireFormatError(f"svd (warm): {k2} residual rows need {k2 * m} entries, got {n_rows}")
        else:
            k, n_row, n_column = section_counts(sections, [torch.float32, dtype, dtype], "svd")
            k2 = 0
            if k > n:
                raise WireFormatError(f"svd: {k} atoms but a {rows} x {columns} matrix has at most {n}")
        if n_row != k * rows or n_column != k * columns:
            raise WireFormatError(
                f"svd: {k} atoms of a {rows} x {columns} matrix need {k * rows} and {k * columns} factor entries, "
                f"got {n_row} and {n_column}"
            )
        weights, row_factors, column_factors = sections[:3]
        check_finite(weights, "svd: weights")
        check_finite(row_factors, "svd: row factors")
        check_finite(column_factors, "svd: column factors")
        if not r:
            index, residual_rows = None, None
        else:
            index, residual_rows = sections[3].long(), sections[4]
            check_increasing_indices(index, n, "svd (warm): residual row indices")
            check_finite(residual_rows, "svd (warm): residual rows")
            residual_rows = residual_rows.reshape(k2, m)
        factors = (row_factors.reshape(k, rows), column_factors.reshape(k, columns))
        return weights, *factors, index, residual_rows, rows, columns

    def unpack(self, sections, shape):
        return self.unpack_add_(sections, torch.zeros(shape, dtype=torch.float32, device=sections[0].device), 1.0)

    def unpack_add_(self, sections, out, alpha):
        if not out.is_contiguous():
            return super().unpack_add_(sections, out, alpha)
        weights, a, b, index, residual_rows, rows, columns = self._sections(sections, tuple(out.shape))
        device, dtype = out.device, out.dtype
        weights = weights.to(device=device, dtype=dtype)
        k = a.shape[0]
        view = out.view(rows, columns)
        scaled = a.T.to(device=device, dtype=dtype) * weights[:k]
        view.addmm_(scaled, b.to(device=device, dtype=dtype), alpha=alpha)  # one matmul for the top atoms
        if index is not None and index.numel():
            added = residual_rows.to(device=device, dtype=dtype) * weights[k:].unsqueeze(1)
            if rows > columns:  # rows of Y are columns of X
                view.index_add_(1, index.to(device), added.T, alpha=alpha)
            else:
                view.index_add_(0, index.to(device), added, alpha=alpha)
        return out

    def expected_sections(self, shape, atoms):
        """The sections' sizes with `atoms` atoms of the exact layout; for the warm layout an upper bound (each
        atom counted as a top atom, k x (R + C) entries; a residual row costs an index and m entries)."""
        rows, columns = matrix_shape(shape, self.reshape)
        r = self.warm_rank(rows, columns)
        atoms = min(atoms, r + min(rows, columns)) if r else min(atoms, rows, columns)
        dtype = ATOM_DTYPES[self.atom_dtype]
        sections = [meta(atoms, torch.float32), meta(atoms * rows, dtype), meta(atoms * columns, dtype)]
        return sections + [meta(0, torch.int32), meta(0, dtype)] if r else sections


@register_codec
class SpectralCodec(AtomicCodec):
    """Spectral ATOMO: `budget` rank-one atoms in expectation, `reshape` "rows" or "paper", `atom_dtype`,
    `basis` "exact" or "warm" (top-`rank` subspace warm-started at the previous step's, plus residual rows)."""

    name = "svd"
    codec_id = CODEC_IDS["svd"]
    decomposition_type = SpectralDecomposition

    def __init__(
        self,
        budget: float,
        reshape: str = "rows",
        atom_dtype: str = "float32",
        basis: str = "exact",
        rank: int = DEFAULT_RANK,
    ):
        super().__init__(budget, reshape=reshape, atom_dtype=atom_dtype, basis=basis, rank=rank)
