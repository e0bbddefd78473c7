"""Codecs: encode a tensor into a `Message`, decode it back into an unbiased estimate.

Every codec is registered under a name (for `make_codec`) and a one-byte id (in the wire header), and
writes the parameters its decoder needs into the header, so that `decode(bytes)` needs nothing else.

Codecs from other packages (plugins) are Python entry points in the group `atomo.codecs`, each naming its
`Codec` subclass (`haar = "atomo_haar:HaarCodec"`), with a codec id of 128 or more. They are imported when
first needed: `make_codec` loads the one it is asked for, and `decode`/`codec_for` load every installed
plugin the first time they meet an unknown codec id.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
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

    def encode_with_state(
        self, tensor: torch.Tensor, state: object, generator: torch.Generator | None = None
    ) -> tuple[Message, object]:
        """Encode with the encoder's per-tensor state from the previous step (None at the first step); return
        the message and the state for the next step. The decoder never needs it. Stateless codecs return None.
        """
        return self.encode(tensor, generator), None

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
        return self.decode_message(self.parse(data, limits))

    def parse(self, data, limits: WireLimits = DEFAULT_LIMITS, out: torch.Tensor | None = None) -> Message:
        """The validated header of a message for this codec (and, given `out`, of `out`'s shape)."""
        msg = decode_message(data, limits)
        if msg.codec_id != self.codec_id:
            raise WireFormatError(f"message has codec id {msg.codec_id}, this {self.name} codec reads {self.codec_id}")
        if out is not None and tuple(msg.shape) != tuple(out.shape):
            raise WireFormatError(f"message shape {tuple(msg.shape)} does not match {tuple(out.shape)}")
        return msg

    def decode_add_(self, data, out: torch.Tensor, alpha: float = 1.0, limits: WireLimits = DEFAULT_LIMITS):
        """out += alpha * decode(data): the parameter server's aggregation step."""
        estimate = self.decode_message(self.parse(data, limits, out))
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
    """The registered codecs: the built-in ones and every plugin loaded so far."""
    return sorted(_BY_NAME)


# Plugins ------------------------------------------------------------------------------------------------

PLUGIN_GROUP = "atomo.codecs"  # services.common.spec reads the same group's names without importing torch
FIRST_PLUGIN_ID = 128  # codec ids below are reserved for the built-in codecs
_plugin_lock = threading.Lock()
_plugins_scanned = False
_plugin_errors: dict[str, str] = {}


def plugin_codec_names() -> list[str]:
    """The names of the installed plugin codecs (entry points of `PLUGIN_GROUP`), without importing them."""
    return sorted({ep.name for ep in entry_points(group=PLUGIN_GROUP)})


def load_plugin(name: str) -> type[Codec]:
    """Import the plugin codec installed under `name`, register its class and return it.

    ValueError (naming the plugin) if none is installed under that name, if importing it fails, or if it is
    not a `Codec` subclass called `name` with a codec id from FIRST_PLUGIN_ID to 255 that no other codec has.
    """
    with _plugin_lock:
        if name in _BY_NAME:
            return _BY_NAME[name]
        found = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == name]
        if not found:
            raise ValueError(f"no plugin codec {name!r} is installed (entry point group {PLUGIN_GROUP!r})")
        where = f"plugin codec {name!r} ({found[0].value})"
        try:
            cls = found[0].load()
        except Exception as exc:  # any import error of someone else's package: say which one
            raise ValueError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
        if name in _BY_NAME:  # importing its module registered it (@register_codec)
            cls = _BY_NAME[name]
        if not (isinstance(cls, type) and issubclass(cls, Codec)):
            raise ValueError(f"{where} is not a Codec subclass: {cls!r}")
        if getattr(cls, "name", None) != name:
            raise ValueError(f"{where}: its class is named {getattr(cls, 'name', None)!r}, not {name!r}")
        if not (isinstance(cls.codec_id, int) and FIRST_PLUGIN_ID <= cls.codec_id <= 255):
            raise ValueError(f"{where}: codec id {cls.codec_id!r} is not in {FIRST_PLUGIN_ID}..255")
        if _BY_NAME.get(name) is not cls:
            owner = _BY_ID.get(cls.codec_id)
            if owner is not None:
                raise ValueError(f"{where}: codec id {cls.codec_id} is already {owner.name!r}'s")
            register_codec(cls)
        return cls


def load_plugins() -> dict[str, str]:
    """Load every installed plugin codec (once per process); return {name: why it failed} for the others."""
    global _plugins_scanned
    if not _plugins_scanned:
        for name in plugin_codec_names():
            try:
                load_plugin(name)
            except ValueError as exc:
                _plugin_errors[name] = str(exc)
        _plugins_scanned = True
    return dict(_plugin_errors)


def make_codec(name: str, **params) -> Codec:
    """Build a codec by name, e.g. `make_codec("svd", budget=3)`: a built-in one or an installed plugin."""
    if name not in _BY_NAME:
        if name not in plugin_codec_names():
            raise ValueError(
                f"unknown codec {name!r}; built-in and loaded codecs: {', '.join(codec_names())}; "
                f"installed plugin codecs: {', '.join(plugin_codec_names()) or 'none'}"
            )
        load_plugin(name)
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
    if cls is None and msg.codec_id >= FIRST_PLUGIN_ID and not _plugins_scanned:
        load_plugins()  # a plugin's first message in this process
        cls = _BY_ID.get(msg.codec_id)
    if cls is None:
        failed = "".join(f"; {error}" for error in _plugin_errors.values())
        raise WireFormatError(f"unknown codec id {msg.codec_id}{failed}")
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
