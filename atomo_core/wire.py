"""The wire form of one encoded tensor: a versioned little-endian header, then typed sections.

Layout (all little-endian)::

    magic    4s   b"ATMO"
    version  u8   WIRE_VERSION
    codec    u8   codec id (CODEC_IDS)
    dtype    u8   dtype of the original tensor (DTYPE_CODES)
    ndim     u8   number of dimensions of the original tensor
    nparams  u8   number of codec parameters
    nsect    u8   number of payload sections
    flags    u16  reserved, 0
    shape    ndim x u32
    params   nparams x f64          codec parameters (budget, bits, ...), exact for ints < 2**53
    sections nsect x (u8 dtype, u64 element count)
    (zero padding of the header to a multiple of 8 bytes)
    payload  each section's bytes, each padded with zeros to a multiple of 8 bytes

`decode_message` checks every field against the buffer and `WireLimits` before anything is allocated,
and raises `WireFormatError` (a ValueError) naming the problem for any malformed input.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

MAGIC = b"ATMO"
WIRE_VERSION = 1

_FIXED = struct.Struct("<4sBBBBBBH")
_SECTION = struct.Struct("<BQ")
_ALIGN = 8

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint8: 6,
    torch.int8: 7,
    torch.int16: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# One id per codec family; ids >= 128 are free for user-registered codecs.
CODEC_IDS: dict[str, int] = {
    "dense": 0,
    "entrywise": 1,
    "svd": 2,
    "fourier": 3,
    "qsgd": 4,
    "terngrad": 5,
    "lq": 6,
    "topk": 7,
    "powersgd": 8,
}


class WireFormatError(ValueError):
    """Raised for any malformed, truncated, oversized or inconsistent encoded message."""


@dataclass(frozen=True)
class WireLimits:
    """Bounds checked before allocating anything for bytes that came from the network."""

    max_elements: int = 1 << 28  # elements of the decoded tensor (1 GiB of fp32)
    max_ndim: int = 8
    max_params: int = 16
    max_sections: int = 16


DEFAULT_LIMITS = WireLimits()


@dataclass
class Message:
    """One encoded tensor: codec id and parameters, the original shape and dtype, and payload sections.

    `bytes(msg)` is the wire form and `len(msg)` its exact length in bytes.
    """

    codec_id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    params: tuple[float, ...] = ()
    sections: list[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def header(self) -> bytes:
        """The header bytes, up to and including the section table."""
        if not 0 <= self.codec_id <= 255:
            raise ValueError(f"codec id {self.codec_id} does not fit in one byte")
        parts = [
            _FIXED.pack(
                MAGIC,
                WIRE_VERSION,
                self.codec_id,
                DTYPE_CODES[self.dtype],
                len(self.shape),
                len(self.params),
                len(self.sections),
                0,
            ),
            struct.pack(f"<{len(self.shape)}I", *self.shape),
            struct.pack(f"<{len(self.params)}d", *self.params),
        ]
        parts += [_SECTION.pack(DTYPE_CODES[s.dtype], s.numel()) for s in self.sections]
        raw = b"".join(parts)
        return raw + bytes(_padded(len(raw)) - len(raw))

    def __len__(self) -> int:
        return len(self.header()) + sum(_padded(s.numel() * s.element_size()) for s in self.sections)

    def buffers(self) -> list[memoryview | bytes]:
        """Header and section buffers whose concatenation is `bytes(msg)` (no copy of the sections)."""
        out: list[memoryview | bytes] = [self.header()]
        for s in self.sections:
            raw = _as_bytes(s)
            out.append(raw)
            pad = _padded(len(raw)) - len(raw)
            if pad:
                out.append(bytes(pad))
        return out

    def __bytes__(self) -> bytes:
        return b"".join(self.buffers())


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def decode_message(data: bytes | bytearray | memoryview | Message, limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Parse and validate the wire form; sections are zero-copy views of `data` (read-only)."""
    if isinstance(data, Message):
        return data
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise WireFormatError(f"expected a bytes-like message, got {type(data).__name__}") from exc
    if len(view) < _FIXED.size:
        raise WireFormatError(f"message of {len(view)} bytes is shorter than the {_FIXED.size}-byte header")
    magic, version, codec_id, dtype_code, ndim, nparams, nsect, _flags = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != WIRE_VERSION:
        raise WireFormatError(f"unsupported wire version {version} (this build reads {WIRE_VERSION})")
    if dtype_code not in CODE_DTYPES or CODE_DTYPES[dtype_code] not in FLOAT_DTYPES:
        raise WireFormatError(f"unknown or non-float tensor dtype code {dtype_code}")
    if ndim > limits.max_ndim:
        raise WireFormatError(f"{ndim} dimensions exceed the limit of {limits.max_ndim}")
    if nparams > limits.max_params:
        raise WireFormatError(f"{nparams} codec parameters exceed the limit of {limits.max_params}")
    if nsect > limits.max_sections:
        raise WireFormatError(f"{nsect} sections exceed the limit of {limits.max_sections}")
    offset = _FIXED.size
    header_len = _padded(offset + 4 * ndim + 8 * nparams + _SECTION.size * nsect)
    if len(view) < header_len:
        raise WireFormatError(f"message of {len(view)} bytes is shorter than its {header_len}-byte header")
    shape = struct.unpack_from(f"<{ndim}I", view, offset)
    offset += 4 * ndim
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if numel > limits.max_elements:
        raise WireFormatError(f"tensor of {numel} elements exceeds the limit of {limits.max_elements}")
    params = struct.unpack_from(f"<{nparams}d", view, offset)
    offset += 8 * nparams
    if not all(np.isfinite(params)):
        raise WireFormatError("non-finite codec parameter")
    table = []
    for _ in range(nsect):
        code, count = _SECTION.unpack_from(view, offset)
        offset += _SECTION.size
        if code not in CODE_DTYPES:
            raise WireFormatError(f"unknown section dtype code {code}")
        if count > limits.max_elements:
            raise WireFormatError(f"section of {count} elements exceeds the limit of {limits.max_elements}")
        table.append((CODE_DTYPES[code], count))
    expected = header_len + sum(_padded(count * _itemsize(dt)) for dt, count in table)
    if expected != len(view):
        raise WireFormatError(f"message is {len(view)} bytes but its header describes {expected}")
    sections = []
    offset = header_len
    for dt, count in table:
        nbytes = count * _itemsize(dt)
        sections.append(_view_tensor(view[offset : offset + nbytes], dt))
        offset += _padded(nbytes)
    return Message(codec_id, tuple(shape), CODE_DTYPES[dtype_code], tuple(params), sections)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _view_tensor(raw: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A read-only view: decoders never write into a received buffer."""
    if len(raw) == 0:
        return torch.empty(0, dtype=dtype)
    as_int16 = dtype == torch.bfloat16
    np_dtype = np.int16 if as_int16 else torch.empty((), dtype=dtype).numpy().dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        t = torch.from_numpy(np.frombuffer(raw, dtype=np_dtype))
    return t.view(torch.bfloat16) if as_int16 else t


def expect_sections(msg: Message, spec: list[tuple[torch.dtype, int]], codec: str) -> None:
    """Check a decoded message's sections against the (dtype, element count) a codec expects."""
    got = [(s.dtype, s.numel()) for s in msg.sections]
    if got != spec:
        raise WireFormatError(f"{codec}: sections {got} do not match the expected {spec}")
