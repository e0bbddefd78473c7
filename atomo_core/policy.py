"""The per-layer policy: which codec encodes each gradient of a model, and the inverse aggregation.

Matrices and convolution kernels (>= 2-D) use the matrix codec; biases and BatchNorm parameters (1-D)
the vector codec. A layer is sent dense (exact) when the codec's expected size would not beat dense by
`min_compression_rate`, decided from the shape before encoding, so the choice never depends on the sample.
A message that nevertheless comes out larger than dense (a rare large sample, or a codec whose size is
not known in advance) is replaced by the dense form of the same sampled estimate: the bytes never exceed
dense and the estimate is unchanged (so an unbiased codec's stays unbiased).

Error feedback: a layer whose codec is a `FeedbackCodec` (the BIASED baselines topk and powersgd) is encoded
with that layer's memory, kept here by layer index, so `encode(tensors)` runs one error-feedback step per
layer (atomo_core/biased/feedback.py). The new memory of every layer is kept only once all layers are
encoded, so an encode that raises leaves the memory as it was. The dense fallback above sends the same
estimate, so the residual (the corrected gradient minus the decoded message) stays exact. `reset_feedback()`
forgets it all (a new run or a new model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from atomo_core.biased import Feedback, FeedbackCodec
from atomo_core.codecs import Codec, DenseCodec, codec_for, decode
from atomo_core.wire import CODEC_IDS, DEFAULT_LIMITS, Message, WireFormatError, WireLimits, decode_message


def dense_nbytes(shape: tuple[int, ...]) -> int:
    """Wire length of the dense fp32 message for a tensor of `shape`."""
    numel = math.prod(shape)
    return len(Message(CODEC_IDS["dense"], tuple(shape), torch.float32, (), [torch.empty(numel, device="meta")]))


@dataclass
class LayerPolicy:
    """Encode a model's gradients (parameter order) into one message per tensor.

    codec: for tensors with >= 2 dimensions. vector_codec: for 0-D and 1-D tensors (default dense).
    min_compression_rate (>= 1, default 1): a layer whose expected compression rate, dense bytes over the
    codec's expected bytes, is below it is sent dense.
    """

    codec: Codec
    vector_codec: Codec = field(default_factory=DenseCodec)
    min_compression_rate: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.min_compression_rate) and self.min_compression_rate >= 1.0):
            raise ValueError(f"min_compression_rate must be finite and >= 1, got {self.min_compression_rate}")
        self._dense = DenseCodec()
        self._feedback: dict[int, Feedback] = {}

    def codec_for_shape(self, shape: tuple[int, ...]) -> Codec:
        """The codec chosen for a tensor of `shape`, before any sampling."""
        codec = self.codec if len(shape) >= 2 else self.vector_codec
        expected = codec.expected_nbytes(tuple(shape))
        if expected is not None and dense_nbytes(tuple(shape)) < self.min_compression_rate * expected:
            return self._dense
        return codec

    def encode(self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[Message]:
        """One message per tensor; layers with a `FeedbackCodec` run one error-feedback step each."""
        messages, feedback = [], {}
        for index, tensor in enumerate(tensors):
            codec = self.codec_for_shape(tuple(tensor.shape))
            if isinstance(codec, FeedbackCodec):
                msg, feedback[index] = codec.encode_with_feedback(tensor, self._feedback.get(index), generator)
            else:
                msg = codec.encode(tensor, generator)
            if len(msg) > dense_nbytes(tuple(tensor.shape)):
                msg = self._dense.encode(decode(bytes(msg)).to(tensor.dtype))
            messages.append(msg)
        self._feedback.update(feedback)
        return messages

    def feedback(self, index: int) -> Feedback | None:
        """The error-feedback memory of layer `index` (None before its first step or without feedback)."""
        return self._feedback.get(index)

    def reset_feedback(self) -> None:
        """Forget every layer's error-feedback memory: the next step starts from zero residuals."""
        self._feedback.clear()


def decode_add_(
    messages: Sequence[Message | bytes | bytearray | memoryview],
    outs: Sequence[torch.Tensor],
    alpha: float = 1.0,
    limits: WireLimits = DEFAULT_LIMITS,
) -> None:
    """outs[i] += alpha * decode(messages[i]) for every layer; WireFormatError if counts or shapes differ.

    Counts and shapes are checked for all layers before anything is added; a layer whose payload is
    malformed raises when its turn comes, after the layers before it were added.
    """
    if len(messages) != len(outs):
        raise WireFormatError(f"{len(messages)} messages for {len(outs)} tensors")
    parsed = [decode_message(m, limits) for m in messages]
    for i, (msg, out) in enumerate(zip(parsed, outs, strict=True)):
        if tuple(msg.shape) != tuple(out.shape):
            raise WireFormatError(f"message {i} has shape {tuple(msg.shape)}, the tensor {tuple(out.shape)}")
    for msg, out in zip(parsed, outs, strict=True):
        codec_for(msg).decode_add_(msg, out, alpha, limits)
