"""Decompositions in an orthonormal basis of the flattened tensor, and their compact wire form.

For an orthonormal basis B (analysis lam = B^T g, synthesis g = B lam) the atoms are the basis vectors and
the coefficients are lam. Algorithm 1 gives p_i = min(1, c |lam_i|) (Appendix B, eq. (14)), so every
selected atom that is not clipped (p_i < 1) has the same weight magnitude |lam_i| / p_i = 1/c in eq. (2).
The wire form uses that: the unclipped atoms cost an index and a sign bit, plus one shared scale 1/c;
the clipped ones (p_i = 1, at most s of them) are sent as index and exact weight lam_i (as are the rare
atoms whose p_i was raised to the dtype's smallest normal number because c |lam_i| underflowed it).

Sections: shared-weight indices (int32, ascending), their signs (uint8, 8 per byte, 1 = negative), the
scale 1/c (one float64), exact-weight indices (int32, ascending), exact weights lam_i / p_i (atom_dtype).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from atomo_core.decompositions.base import (
    ATOM_DTYPES,
    AtomicDecomposition,
    atom_dtype_code,
    atom_dtype_name,
    check_finite,
    meta,
    section_counts,
)
from atomo_core.wire import WireFormatError

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


class OrthonormalBasisDecomposition(AtomicDecomposition):
    """Atoms = an orthonormal basis of R^numel. Subclasses give the analysis and synthesis maps.

    `atom_dtype` ("float32" or "float16") is the dtype of the clipped atoms' values on the wire; the
    unclipped weights are the exact shared scale 1/c.
    """

    def __init__(self, atom_dtype: str = "float32"):
        atom_dtype_code(atom_dtype)
        self.atom_dtype = atom_dtype

    @abstractmethod
    def analysis(self, flat: torch.Tensor) -> torch.Tensor:
        """Coefficients lam = B^T g of the flattened tensor (float32 or float64)."""

    @abstractmethod
    def synthesis(self, lam: torch.Tensor) -> torch.Tensor:
        """The flattened tensor B lam rebuilt from coefficients."""

    def wire_params(self):
        return (atom_dtype_code(self.atom_dtype),)

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 1:
            raise WireFormatError(f"{cls.__name__}: expected 1 decomposition parameter (atom dtype), got {len(params)}")
        return cls(atom_dtype_name(params[0]))

    def decompose(self, tensor):
        flat = tensor.reshape(-1)
        if flat.dtype != torch.float64:
            flat = flat.to(torch.float32)
        return self.analysis(flat), None

    def pack(self, state, index, lam, p):
        """`pack_selected` from host copies of the selected atoms: one packing, whichever path encodes."""
        host = [t.detach().cpu().numpy() for t in (index, lam.to(torch.float64), p.to(torch.float64))]
        return self.pack_selected(state, index, lam, p, *host)

    def pack_selected(self, state, index, lam, p, host_index, host_lam, host_p):
        """The sections carrying sum_k (lam_k / p_k) a_{index_k} (eq. (2)), computed on the host from its copy
        of the selected atoms (the batched encode's, or `pack`'s), then moved to lam's device without waiting:
        weights lam_i / p_i; the atoms with p_i = c |lam_i| < 1 share one weight 1/c (sent once, with their
        signs as bits), except where p_i was raised to the dtype's tiny because c |lam_i| underflowed it."""
        weight = host_lam / host_p  # lam_i / p_i of eq. (2)
        shared = host_p < 1
        scale = np.zeros(1, dtype=np.float64)
        if shared.any():
            scale[0] = np.abs(weight)[np.argmax(np.where(shared, host_p, 0))]
            shared &= np.abs(np.abs(weight) - scale[0]) <= 1e-3 * scale[0]
        with np.errstate(over="ignore"):
            exact = weight[~shared].astype(np.float16 if self.atom_dtype == "float16" else np.float32)
        if not np.isfinite(exact).all():
            raise ValueError(f"atom_dtype {self.atom_dtype} cannot represent the weights lam_i/p_i: use float32")
        sections = [
            torch.from_numpy(host_index[shared].astype(np.int32)),
            torch.from_numpy(np.packbits(host_lam[shared] < 0, bitorder="little")),
            torch.from_numpy(scale),
            torch.from_numpy(host_index[~shared].astype(np.int32)),
            torch.from_numpy(exact),
        ]
        return [section.to(lam.device, non_blocking=True) for section in sections]

    def unpack(self, sections, shape):
        numel = _numel(shape)
        dtypes = [torch.int32, torch.uint8, torch.float64, torch.int32, ATOM_DTYPES[self.atom_dtype]]
        n_unclipped, n_sign_bytes, n_scale, n_clipped, n_values = section_counts(sections, dtypes, type(self).__name__)
        if n_sign_bytes != -(-n_unclipped // 8) or n_scale != 1 or n_values != n_clipped:
            raise WireFormatError(
                f"sparse coefficients: {n_unclipped} indices need {-(-n_unclipped // 8)} sign bytes (got "
                f"{n_sign_bytes}), one scale (got {n_scale}) and {n_clipped} values (got {n_values})"
            )
        if n_unclipped + n_clipped > numel:
            raise WireFormatError(f"sparse coefficients: {n_unclipped + n_clipped} atoms but only {numel} exist")
        unclipped_index, signs, scale, clipped_index, values = sections
        _check_indices(unclipped_index, numel)
        _check_indices(clipped_index, numel)
        check_finite(scale, "sparse coefficients: scale")
        if float(scale[0]) < 0:
            raise WireFormatError("sparse coefficients: negative scale")
        check_finite(values, "sparse coefficients: values")
        lam = torch.zeros(numel, dtype=torch.float32, device=values.device)
        negative = _unpack_bits(signs, n_unclipped)
        lam[unclipped_index.long()] = torch.where(negative, -1.0, 1.0) * float(scale[0])  # weight sign(lam_i)/c
        lam.index_add_(0, clipped_index.long(), values.to(torch.float32))
        return self.synthesis(lam).reshape(shape)

    def expected_sections(self, shape, atoms):
        atoms = min(atoms, _numel(shape))
        # Sized as if no atom were clipped: clipped atoms cost an exact weight instead of a sign bit.
        value_dtype = ATOM_DTYPES[self.atom_dtype]
        return [meta(atoms, torch.int32), meta(atoms / 8, torch.uint8), meta(1, torch.float64)] + [
            meta(0, torch.int32),
            meta(0, value_dtype),
        ]


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = (packed.to(torch.int32).unsqueeze(1) // _BIT_WEIGHTS.to(packed.device)) % 2
    return bits.reshape(-1)[:count].bool()


def _check_indices(index: torch.Tensor, numel: int) -> None:
    if index.numel() == 0:
        return
    if int(index.min()) < 0 or int(index.max()) >= numel:
        raise WireFormatError(f"sparse coefficients: atom index out of range [0, {numel})")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise WireFormatError("sparse coefficients: atom indices are not strictly increasing")
