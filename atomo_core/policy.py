"""The per-layer policy: which codec encodes each gradient of a model, and the inverse aggregation.

Matrices and convolution kernels (>= 2-D) use the matrix codec; biases and BatchNorm parameters (1-D)
the vector codec. A layer is sent dense (exact) when the codec's expected size would not beat dense by
`min_compression_rate`, decided from the shape before encoding, so the choice never depends on the sample.
A message that nevertheless comes out larger than dense (a rare large sample, or a codec whose size is
not known in advance) is replaced by the dense form of the same sampled estimate: the bytes never exceed
dense and the estimate is unchanged (so an unbiased codec's stays unbiased).

Encoder state: a codec may carry per-layer state from step to step (`Codec.encode_with_state`), kept here by
layer index: the error-feedback memory of the BIASED baselines topk and powersgd (`FeedbackCodec`, a
`Feedback` per layer, atomo_core/biased/feedback.py) and the warm spectral basis Q of `svd` with
basis="warm" (a tensor per layer, atomo_core/decompositions/spectral.py), so `encode(tensors)` runs one
step per layer. The new state of every layer is kept only once all layers are encoded, so an encode that
raises leaves the state as it was. The dense fallback above sends the same estimate, so a feedback residual
(the corrected gradient minus the decoded message) stays exact. `reset_feedback()` forgets all of it (a new
run or a new model); `state_dict()` and `load_state_dict()` carry it through a checkpoint. Decoding never
needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from atomo_core.biased import Feedback
from atomo_core.codecs import Codec, DenseCodec, codec_for, decode
from atomo_core.decompositions.base import AtomicCodec
from atomo_core.decompositions.spectral import SpectralDecomposition
from atomo_core.wire import CODEC_IDS, DEFAULT_LIMITS, Message, WireFormatError, WireLimits, decode_message

STATE_VERSION = 1


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
    batched: whether the layers that share one ATOMO codec are encoded together (`AtomicCodec.encode_many`:
    one host sync per model). None (the default): on a GPU always; on the CPU, where a host sync costs
    nothing, for the spectral codec only (measured by bench/syncs.py on ResNet-18, 2 CPU threads: svd 0.80x
    the per-layer time, entrywise and fourier 2-2.5x, which the padded model-wide Newton passes cost).
    """

    codec: Codec
    vector_codec: Codec = field(default_factory=DenseCodec)
    min_compression_rate: float = 1.0
    batched: bool | None = None

    def __post_init__(self):
        if not (math.isfinite(self.min_compression_rate) and self.min_compression_rate >= 1.0):
            raise ValueError(f"min_compression_rate must be finite and >= 1, got {self.min_compression_rate}")
        self._dense = DenseCodec()
        self._state: dict[int, Feedback | torch.Tensor] = {}

    def codec_for_shape(self, shape: tuple[int, ...]) -> Codec:
        """The codec chosen for a tensor of `shape`, before any sampling."""
        codec = self.codec if len(shape) >= 2 else self.vector_codec
        expected = codec.expected_nbytes(tuple(shape))
        if expected is not None and dense_nbytes(tuple(shape)) < self.min_compression_rate * expected:
            return self._dense
        return codec

    def _batched(self, codec: Codec, device: torch.device) -> bool:
        """Whether `codec` encodes its layers together (an `AtomicCodec` with the common per-layer path; see
        `batched`)."""
        if not (isinstance(codec, AtomicCodec) and type(codec).encode_with_state is AtomicCodec.encode_with_state):
            return False
        if self.batched is not None:
            return self.batched
        return device.type != "cpu" or isinstance(codec.decomposition, SpectralDecomposition)

    def encode(self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[Message]:
        """One message per tensor; a layer whose codec keeps state (feedback, warm basis) runs one step of it.

        The layers that share one ATOMO codec (`AtomicCodec`) are encoded together by its `encode_many` (one
        host sync for all of them) where `batched` says so, when the first of them comes in parameter order;
        every other layer by its codec's `encode_with_state`, in parameter order (also an `AtomicCodec`
        subclass's that overrides `encode_with_state`, so that its own encoding is kept).
        """
        codecs = [self.codec_for_shape(tuple(tensor.shape)) for tensor in tensors]
        batched = [self._batched(codec, tensor.device) for codec, tensor in zip(codecs, tensors, strict=True)]
        groups: dict[int, list[int]] = {}
        for index, codec in enumerate(codecs):
            if batched[index]:
                groups.setdefault(id(codec), []).append(index)
        encoded: dict[int, tuple[Message, object]] = {}
        for index, (tensor, codec) in enumerate(zip(tensors, codecs, strict=True)):
            if index in encoded:
                continue
            if batched[index]:
                layers = groups[id(codec)]
                batch = codec.encode_many([tensors[i] for i in layers], [self._state.get(i) for i in layers], generator)
                encoded.update(zip(layers, zip(*batch, strict=True), strict=True))
            else:
                encoded[index] = codec.encode_with_state(tensor, self._state.get(index), generator)
        messages, states = [], {}
        for index, tensor in enumerate(tensors):
            msg, state = encoded[index]
            if state is not None:
                states[index] = state
            if len(msg) > dense_nbytes(tuple(tensor.shape)):
                msg = self._dense.encode(decode(bytes(msg)).to(tensor.dtype))
            messages.append(msg)
        self._state.update(states)
        return messages

    def feedback(self, index: int) -> Feedback | None:
        """The error-feedback memory of layer `index` (None before its first step or without feedback)."""
        state = self._state.get(index)
        return state if isinstance(state, Feedback) else None

    def state(self, index: int) -> Feedback | torch.Tensor | None:
        """Layer `index`'s encoder state: its `Feedback`, its warm basis Q (n x r), or None."""
        return self._state.get(index)

    def reset_feedback(self) -> None:
        """Forget every layer's encoder state (error-feedback memory, warm bases): the next step starts afresh."""
        self._state.clear()

    def state_dict(self) -> dict:
        """Every layer's encoder state as plain CPU tensors, for `torch.save` (and `torch.load(weights_only=True)`):
        {"version": 1, "layers": {index: {"kind": "feedback", "residual": e, "warm_start": Q or None} or
        {"kind": "basis", "basis": Q}}}."""
        layers: dict[int, dict] = {}
        for index, state in self._state.items():
            if isinstance(state, Feedback):
                warm = None if state.warm_start is None else state.warm_start.detach().cpu().clone()
                residual = state.residual.detach().cpu().clone()
                layers[index] = {"kind": "feedback", "residual": residual, "warm_start": warm}
            else:
                layers[index] = {"kind": "basis", "basis": state.detach().cpu().clone()}
        return {"version": STATE_VERSION, "layers": layers}

    def load_state_dict(self, state_dict: dict) -> None:
        """Replace every layer's encoder state with a `state_dict()`'s; ValueError (and nothing changed) if it is
        malformed. Shapes are checked against the layers at their next encode (a mismatch is a ValueError)."""
        if not isinstance(state_dict, dict) or state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"policy state: expected a dict with version {STATE_VERSION}")
        layers = state_dict.get("layers")
        if not isinstance(layers, dict):
            raise ValueError("policy state: 'layers' must be a dict")
        loaded: dict[int, Feedback | torch.Tensor] = {}
        for index, entry in layers.items():
            if not (isinstance(index, int) and index >= 0 and isinstance(entry, dict)):
                raise ValueError(f"policy state: layer {index!r} must be an index >= 0 with a dict entry")
            kind = entry.get("kind")
            if kind == "feedback" and set(entry) == {"kind", "residual", "warm_start"}:
                warm = entry["warm_start"]
                loaded[index] = Feedback(
                    _state_tensor(entry["residual"], index, "residual", None),
                    None if warm is None else _state_tensor(warm, index, "warm_start", 2),
                )
            elif kind == "basis" and set(entry) == {"kind", "basis"}:
                loaded[index] = _state_tensor(entry["basis"], index, "basis", 2)
            else:
                raise ValueError(f"policy state: layer {index} has an unknown entry {sorted(entry)} of kind {kind!r}")
        self._state = loaded


def _state_tensor(value, index: int, what: str, ndim: int | None) -> torch.Tensor:
    """A checkpointed state tensor: float32 or float64, finite, and `ndim`-dimensional where given."""
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"policy state: layer {index} {what} must be a float32 or float64 tensor")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"policy state: layer {index} {what} must have {ndim} dimensions, got {value.dim()}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"policy state: layer {index} {what} has non-finite entries")
    return value.clone()


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
