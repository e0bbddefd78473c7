"""Codecs: encode a tensor into a `Message`, decode it back into an unbiased estimate.

Every codec is registered under a name (for `make_codec`) and a one-byte id (in the wire header), and
writes the parameters its decoder needs into the header, so that `decode(bytes)` needs nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from atomo_core.wire import (
    CODEC_IDS,
    DEFAULT_LIMITS,
    Message,
    WireFormatError,
    WireLimits,
    decode_message,
    expect_sections,
)


class Codec(ABC):
    """Encodes one tensor; `decode(encode(x))` is an unbiased estimate of `x` with x's shape and dtype."""

    name: ClassVar[str]
    codec_id: ClassVar[int]

    @abstractmethod
    def encode(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> Message:
        """Encode `tensor`; a `generator` makes the sampling reproducible."""

    @abstractmethod
    def wire_params(self) -> tuple[float, ...]:
        """The parameters written into the header (what `from_wire_params` reads back)."""

    @classmethod
    @abstractmethod
    def from_wire_params(cls, params: tuple[float, ...]) -> Codec:
        """Rebuild the codec from header parameters; raise WireFormatError if they are invalid."""

    @abstractmethod
    def decode_message(self, msg: Message) -> torch.Tensor:
        """Decode a parsed message whose header was already validated; check the sections here."""

    def decode(self, data: Message | bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS):
        msg = decode_message(data, limits)
        if msg.codec_id != self.codec_id:
            raise WireFormatError(f"message has codec id {msg.codec_id}, this {self.name} codec reads {self.codec_id}")
        return self.decode_message(msg)

    def decode_add_(self, data, out: torch.Tensor, alpha: float = 1.0, limits: WireLimits = DEFAULT_LIMITS):
        """out += alpha * decode(data): the parameter server's aggregation step."""
        estimate = self.decode(data, limits)
        if estimate.shape != out.shape:
            raise WireFormatError(f"message shape {tuple(estimate.shape)} does not match {tuple(out.shape)}")
        return out.add_(estimate.to(device=out.device, dtype=out.dtype), alpha=alpha)

    def expected_nbytes(self, shape: tuple[int, ...]) -> int | None:
        """The expected wire length (or an estimate of it) for a tensor of `shape`, if known before encoding.

        The per-layer policy uses it to send a layer dense when compression would not pay; None: unknown.
        """
        return None

    def _message(self, tensor: torch.Tensor, sections: list[torch.Tensor]) -> Message:
        return Message(self.codec_id, tuple(tensor.shape), tensor.dtype, self.wire_params(), sections)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.wire_params()}"


_BY_NAME: dict[str, type[Codec]] = {}
_BY_ID: dict[int, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make `cls` available to `make_codec(cls.name)` and to `decode`."""
    if cls.name in _BY_NAME or cls.codec_id in _BY_ID:
        raise ValueError(f"codec {cls.name!r} (id {cls.codec_id}) is already registered")
    _BY_NAME[cls.name] = cls
    _BY_ID[cls.codec_id] = cls
    return cls


def codec_names() -> list[str]:
    return sorted(_BY_NAME)


def make_codec(name: str, **params) -> Codec:
    """Build a registered codec by name, e.g. `make_codec("svd", budget=3)`."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}")
    try:
        return _BY_NAME[name](**params)
    except TypeError as exc:  # unexpected keyword: say which codec and what it takes
        raise ValueError(f"codec {name!r}: {exc}") from exc


def decode(data: Message | bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Decode any registered codec's message from its wire form alone."""
    msg = decode_message(data, limits)
    return codec_for(msg).decode_message(msg)


def codec_for(msg: Message) -> Codec:
    """The codec that reads a parsed message, from its header's codec id and parameters."""
    cls = _BY_ID.get(msg.codec_id)
    if cls is None:
        raise WireFormatError(f"unknown codec id {msg.codec_id}")
    return cls.from_wire_params(msg.params)


@register_codec
class DenseCodec(Codec):
    """The uncompressed baseline: the tensor in fp32."""

    name = "dense"
    codec_id = CODEC_IDS["dense"]

    def encode(self, tensor, generator=None):
        return self._message(tensor, [tensor.detach().reshape(-1).to(torch.float32)])

    def wire_params(self):
        return ()

    @classmethod
    def from_wire_params(cls, params):
        if params:
            raise WireFormatError(f"dense: expected no parameters, got {len(params)}")
        return cls()

    def decode_message(self, msg):
        expect_sections(msg, [(torch.float32, msg.numel)], self.name)
        return msg.sections[0].reshape(msg.shape).to(msg.dtype)
