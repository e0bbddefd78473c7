"""l_q quantization (Section 4, Theorem 5): L_q(g)_i = ||g||_q sign(g_i) zeta_i, zeta_i ~ Bernoulli(|g_i| / ||g||_q).

For q in (0, inf], ||g||_q >= ||g||_inf, so every |g_i| / ||g||_q is a probability. The estimate is
unbiased and E||L_q(g)||_2^2 = ||g||_1 ||g||_q. q = 2 is 1-bit QSGD, q = inf is TernGrad.
Each message is coded in 2 bits per entry or as Elias-coded sparse indices, whichever is smaller.
"""

from __future__ import annotations

import math

import torch

from atomo_core.codecs import register_codec
from atomo_core.quantizers.ternary import TernaryCodec
from atomo_core.wire import CODEC_IDS, WireFormatError


@register_codec
class LqCodec(TernaryCodec):
    """`q` in (0, inf] (default 2). The header cannot carry inf: q = inf is written as 0."""

    name = "lq"
    codec_id = CODEC_IDS["lq"]
    allow_sparse = True

    def __init__(self, q: float = 2.0):
        if not q > 0:
            raise ValueError(f"lq: q must be in (0, inf], got {q}")
        self.q = float(q)

    def scale(self, flat):
        largest = flat.abs().max()
        if math.isinf(self.q) or largest == 0:
            return largest
        # ||g||_q = max|g| * ||g / max|g|| ||_q: no overflow or underflow of |g_i|^q in float32.
        return largest * torch.linalg.vector_norm(flat / largest, ord=self.q)

    def wire_params(self):
        return (0.0 if math.isinf(self.q) else self.q,)

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 1 or params[0] < 0:
            raise WireFormatError(f"lq: expected one parameter q >= 0 (0 for inf), got {params}")
        return cls(q=params[0] or math.inf)
