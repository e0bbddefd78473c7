"""Messages between the parameter server and its workers: a small versioned header frame.

Every ZeroMQ multipart message is one header frame followed by payload frames (encoded
`atomo_core.wire` messages, model state). The header's wire form::

    magic    4s   b"ATHD"
    version  u8   PROTOCOL_VERSION
    type     u8   MsgType
    body     compact UTF-8 JSON object {"run_id", "step", "worker_id", "timings", "meta"}

`unpack_header` bounds the size before parsing anything, checks every field, and raises only
`ProtocolError`, whose `reason` is one of `REASONS` (a bounded label set for the PS's
`atomo_ps_dropped_messages_total{reason}` counter).

Message types and their meta::

    REGISTER   worker -> PS   {"device", "address", "metrics_port", "pid"}
    RUN        PS -> worker   {"spec": RunSpec dict, "shard": i, "num_shards": n, ...}; frames: initial state
    UPDATE     PS -> worker   the step's update; frames: encoded messages or dense model
    GRADIENT   worker -> PS   frames: one encoded atomo_core Message per parameter (+ BN buffers)
    HEARTBEAT  both directions
    STOP       PS -> worker   run over / shutting down; {"reason"}
    REJECT     PS -> worker   e.g. unknown worker, please register; {"reason"}
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
MAGIC = b"ATHD"
MAX_HEADER_BYTES = 65536
MAX_NAME_CHARS = 64
MAX_TIMINGS = 16
MAX_STEP = 2**53  # steps are exact in any JSON reader below this

_PREFIX = struct.Struct("<4sBB")
_NAME = re.compile(r"[A-Za-z0-9_.:@/+=-]*")
_FIELDS = frozenset({"run_id", "step", "worker_id", "timings", "meta"})


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in a header")


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)

# Every reason a ProtocolError may carry (bounded metric label values).
REASONS = (
    "bad_header",  # not a header: too short, wrong magic, not a JSON object, a field of the wrong type
    "bad_version",  # a header of another protocol version
    "unknown_type",  # a message type this version does not know
    "bad_field",  # a field out of its bounds (name length or charset, negative step, non-finite timing)
    "oversized",  # a header longer than the limit
    "too_many_frames",  # a multipart message with more frames than accepted
)


class MsgType(enum.IntEnum):
    REGISTER = 1
    RUN = 2
    UPDATE = 3
    GRADIENT = 4
    HEARTBEAT = 5
    STOP = 6
    REJECT = 7


class ProtocolError(ValueError):
    """A malformed header or message; `reason` is one of `REASONS`, the message says what was wrong."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown protocol error reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass
class Header:
    type: MsgType
    run_id: str = ""  # at most 64 characters of [A-Za-z0-9_.:@/+=-]
    step: int = 0  # 0 <= step < 2**53
    worker_id: str = ""  # at most 64 characters, same charset
    timings: dict[str, float] = field(default_factory=dict)  # e.g. compute_s, encode_s, ps_s; finite, <= 16 keys
    meta: dict = field(default_factory=dict)  # small JSON object


def pack_header(header: Header) -> bytes:
    """The header frame; raises ProtocolError for a header the peer would reject."""
    _check_type(header.type)
    body = {
        "run_id": header.run_id,
        "step": header.step,
        "worker_id": header.worker_id,
        "timings": header.timings,
        "meta": header.meta,
    }
    _check_fields(body)
    try:
        text = _ENCODER.encode(body).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_field", f"header is not JSON-serialisable: {exc}") from exc
    raw = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(header.type)) + text
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("oversized", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return raw


def unpack_header(buf, max_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Parse and validate a header frame (any bytes-like object); raises only ProtocolError."""
    try:
        view = memoryview(buf).cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_header", f"header is not a contiguous buffer ({type(buf).__name__})") from exc
    if len(view) > max_bytes:
        raise ProtocolError("oversized", f"header of {len(view)} bytes exceeds {max_bytes}")
    if len(view) < _PREFIX.size:
        raise ProtocolError("bad_header", f"header of {len(view)} bytes is shorter than {_PREFIX.size}")
    magic, version, type_code = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError("bad_header", f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {version}, this build speaks {PROTOCOL_VERSION}")
    msg_type = _check_type(type_code)
    try:
        body = _DECODER.decode(bytes(view[_PREFIX.size :]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError("bad_header", f"header body is not valid JSON: {str(exc)[:80]}") from exc
    if not isinstance(body, dict) or set(body) != _FIELDS:
        raise ProtocolError("bad_header", f"header body must be an object with exactly the fields {sorted(_FIELDS)}")
    _check_fields(body)
    timings = {key: float(value) for key, value in body["timings"].items()}
    return Header(msg_type, body["run_id"], body["step"], body["worker_id"], timings, body["meta"])


def check_name(name: str, what: str) -> str:
    """A run or worker id: at most 64 characters of [A-Za-z0-9_.:@/+=-]."""
    if not isinstance(name, str):
        raise ProtocolError("bad_header", f"{what} must be a string, got {type(name).__name__}")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise ProtocolError("bad_field", f"{what} {name[:MAX_NAME_CHARS]!r} is longer than 64 or has other characters")
    return name


def _check_type(code) -> MsgType:
    try:
        return MsgType(code)
    except ValueError as exc:
        raise ProtocolError("unknown_type", f"unknown message type {code!r}") from exc


def _check_fields(body: dict) -> None:
    check_name(body["run_id"], "run_id")
    check_name(body["worker_id"], "worker_id")
    step = body["step"]
    if type(step) is not int:
        raise ProtocolError("bad_header", f"step must be an integer, got {type(step).__name__}")
    if not 0 <= step < MAX_STEP:
        raise ProtocolError("bad_field", f"step {step} is outside [0, 2**53)")
    timings = body["timings"]
    if not isinstance(timings, dict):
        raise ProtocolError("bad_header", f"timings must be an object, got {type(timings).__name__}")
    if len(timings) > MAX_TIMINGS:
        raise ProtocolError("bad_field", f"{len(timings)} timings exceed the limit of {MAX_TIMINGS}")
    for key, value in timings.items():
        check_name(key, "timing name")
        if type(value) not in (int, float):
            raise ProtocolError("bad_header", f"timing {key!r} must be a number, got {type(value).__name__}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond the float range
            finite = False
        if not finite:
            raise ProtocolError("bad_field", f"timing {key!r} must be a finite number")
    if not isinstance(body["meta"], dict):
        raise ProtocolError("bad_header", f"meta must be an object, got {type(body['meta']).__name__}")
