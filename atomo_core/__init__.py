"""ATOMO: unbiased, variance-optimal atomic sparsification of stochastic gradients.

Wang, Sievert, Charles, Liu, Wright, Papailiopoulos, "ATOMO: Communication-efficient Learning via
Atomic Sparsification", NeurIPS 2018. Section and equation numbers in docstrings refer to that paper.
"""

import atomo_core.decompositions  # noqa: F401  (registers the ATOMO codecs)
import atomo_core.quantizers  # noqa: F401  (registers the quantization codecs)
from atomo_core.codecs import Codec, codec_names, decode, make_codec, register_codec
from atomo_core.wire import Message, WireFormatError, WireLimits

__all__ = [
    "Codec",
    "Message",
    "WireFormatError",
    "WireLimits",
    "codec_names",
    "decode",
    "make_codec",
    "register_codec",
]
