"""BIASED baseline codecs with error feedback: `topk` and `powersgd`, for comparison with ATOMO.

Their estimates are biased (E[decode(encode(g))] != g); the residual memory that makes them converge is
kept by the encoder (`FeedbackCodec.encode_with_feedback`, one `Feedback` per layer in `LayerPolicy`), and
their messages decode statelessly like every other codec's.
"""

from atomo_core.biased.feedback import Feedback, FeedbackCodec
from atomo_core.biased.powersgd import PowerSGDCodec
from atomo_core.biased.topk import TopKCodec

__all__ = ["Feedback", "FeedbackCodec", "PowerSGDCodec", "TopKCodec"]
