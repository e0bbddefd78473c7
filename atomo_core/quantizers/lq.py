"""l_q quantization (Section 4, Theorem 5): L_q(g)_i = ||g||_q sign(g_i) zeta_i, zeta_i ~ Bernoulli(|g_i| / ||g||_q).

For q in (0, inf], ||g||_q >= ||g||_inf, so every |g_i| / ||g||_q is a probability. The estimate is
unbiased and E||L_q(g)||_2^2 = ||g||_1 ||g||_q. q = 2 is 1-bit QSGD, q = inf is TernGrad.
The `coding` option: "elias" codes each message on the host in 2 bits per entry or as Elias-coded sparse
indices, whichever is smaller; "fixed" always packs 2 bits per entry on the tensor's device (no copy of the
tensor to the host); "auto" (the default) is "fixed" for tensors off the CPU, else "elias".
"""

from __future__ import annotations

import math

import torch

from atomo_core.codecs import register_codec
from atomo_core.quantizers.bitpack import check_coding
from atomo_core.quantizers.ternary import TernaryCodec
from atomo_core.wire import CODEC_IDS, WireFormatError


@register_codec
class LqCodec(TernaryCodec):
    """`q` in (0, inf] (default 2); `coding` "auto" (default), "elias" or "fixed" (see above).

    The header cannot carry inf: q = inf is written as 0. The coding is not a header parameter: each message's
    meta section says how its payload is coded.
    """

    name = "lq"
    codec_id = CODEC_IDS["lq"]
    allow_sparse = True

    def __init__(self, q: float = 2.0, coding: str = "auto"):
        if not q > 0:
            raise ValueError(f"lq: q must be in (0, inf], got {q}")
        self.q = float(q)
        self.coding = check_coding(self.name, coding)

    def scale(self, flat):
        largest = flat.abs().max()
        if math.isinf(self.q):
            return largest
        # ||g||_q = max|g| * ||g / max|g|| ||_q: no overflow or underflow of |g_i|^q in float32. A zero tensor
        # has scale 0; torch.where rather than an `if` keeps the scale on the device (no host sync).
        norm = torch.linalg.vector_norm(flat / torch.where(largest > 0, largest, 1), ord=self.q)
        return torch.where(largest > 0, largest * norm, largest)

    def wire_params(self):
        return (0.0 if math.isinf(self.q) else self.q,)

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 1 or params[0] < 0:
            raise WireFormatError(f"lq: expected one parameter q >= 0 (0 for inf), got {params}")
        return cls(q=params[0] or math.inf)
