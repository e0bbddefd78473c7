"""The paper's quantization baselines: QSGD with Elias coding, TernGrad, l_q quantization (Section 4).

Importing this package registers the codecs "qsgd", "terngrad" and "lq".
"""

from atomo_core.quantizers.lq import LqCodec
from atomo_core.quantizers.qsgd import QSGDCodec, elias_bits_bound
from atomo_core.quantizers.terngrad import TernGradCodec

__all__ = ["LqCodec", "QSGDCodec", "TernGradCodec", "elias_bits_bound"]
