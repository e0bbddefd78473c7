"""Entry-wise ATOMO: the standard basis, g = sum_i g_i e_i (Section 5, Table 1)."""

from __future__ import annotations

from atomo_core.codecs import register_codec
from atomo_core.decompositions.base import AtomicCodec
from atomo_core.decompositions.basis import OrthonormalBasisDecomposition
from atomo_core.wire import CODEC_IDS


class EntrywiseDecomposition(OrthonormalBasisDecomposition):
    """Atoms e_i, coefficients the entries themselves."""

    def analysis(self, flat):
        return flat

    def synthesis(self, lam):
        return lam


@register_codec
class EntrywiseCodec(AtomicCodec):
    """Entry-wise ATOMO: `budget` entries kept in expectation, `atom_dtype` of the clipped values.

    Wire cost: 4 bytes and 1 bit per selected unclipped entry, 4 + 4 (or 2 for float16) bytes per
    clipped entry, plus the header. float16 rounds the clipped values only, so the estimate stays
    unbiased for the gradient with those entries rounded to float16.
    """

    name = "entrywise"
    codec_id = CODEC_IDS["entrywise"]
    decomposition_type = EntrywiseDecomposition

    def __init__(self, budget: float, atom_dtype: str = "float32"):
        super().__init__(budget, atom_dtype=atom_dtype)
