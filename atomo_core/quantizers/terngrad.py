"""TernGrad (Wen et al. 2017): T(g)_i = ||g||_inf sign(g_i) zeta_i, zeta_i ~ Bernoulli(|g_i| / ||g||_inf) (Section 4).

Two bits per entry. With `clip` = c, g is first clipped to [-c sigma, c sigma] (sigma the standard deviation
of g's entries), as in TernGrad's gradient clipping: that makes the estimate BIASED (it is unbiased for the
clipped gradient, not for g).
"""

from __future__ import annotations

import torch

from atomo_core.codecs import register_codec
from atomo_core.quantizers.ternary import TernaryCodec
from atomo_core.wire import CODEC_IDS, WireFormatError


@register_codec
class TernGradCodec(TernaryCodec):
    """`clip`: None (default, unbiased) or c > 0 (biased clipping at c standard deviations; TernGrad uses 2.5).

    On the wire the parameter is c, or 0 for no clipping.
    """

    name = "terngrad"
    codec_id = CODEC_IDS["terngrad"]

    def __init__(self, clip: float | None = None):
        if clip is not None and not (clip > 0 and clip != float("inf")):
            raise ValueError(f"terngrad: clip must be None or a finite c > 0, got {clip}")
        self.clip = None if clip is None else float(clip)

    def prepare(self, flat):
        if self.clip is None or flat.numel() == 0:
            return flat
        bound = self.clip * flat.std(correction=0)
        return torch.minimum(torch.maximum(flat, -bound), bound)

    def scale(self, flat):
        return flat.abs().max()

    def wire_params(self):
        return (0.0 if self.clip is None else self.clip,)

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 1 or params[0] < 0:
            raise WireFormatError(f"terngrad: expected one parameter clip >= 0, got {params}")
        return cls(clip=params[0] or None)
