"""ATOMO: unbiased, variance-optimal atomic sparsification of stochastic gradients.

Wang, Sievert, Charles, Liu, Wright, Papailiopoulos, "ATOMO: Communication-efficient Learning via
Atomic Sparsification", NeurIPS 2018. Section and equation numbers in docstrings refer to that paper.
"""

import atomo_core.biased  # noqa: F401  (registers the biased baselines with error feedback)
import atomo_core.decompositions  # noqa: F401  (registers the ATOMO codecs)
import atomo_core.quantizers  # noqa: F401  (registers the quantization codecs)
from atomo_core.biased import Feedback, FeedbackCodec
from atomo_core.codecs import (
    PLUGIN_GROUP,
    Codec,
    codec_for,
    codec_names,
    decode,
    load_plugin,
    load_plugins,
    make_codec,
    plugin_codec_names,
    register_codec,
)
from atomo_core.decompositions import AtomicCodec, AtomicDecomposition, OrthonormalBasisDecomposition
from atomo_core.policy import LayerPolicy, decode_add_, dense_nbytes
from atomo_core.probabilities import atomic_probabilities
from atomo_core.wire import Message, WireFormatError, WireLimits

__all__ = [
    "AtomicCodec",
    "AtomicDecomposition",
    "Codec",
    "Feedback",
    "FeedbackCodec",
    "LayerPolicy",
    "Message",
    "PLUGIN_GROUP",
    "OrthonormalBasisDecomposition",
    "WireFormatError",
    "WireLimits",
    "atomic_probabilities",
    "codec_for",
    "codec_names",
    "decode",
    "decode_add_",
    "dense_nbytes",
    "load_plugin",
    "load_plugins",
    "make_codec",
    "plugin_codec_names",
    "register_codec",
]
