"""Messages between the parameter server and its workers: a small versioned header frame.

Every ZeroMQ multipart message is one header frame followed by payload frames (encoded
`atomo_core.wire` messages, model state). The header's wire form::

    magic    4s   b"ATHD"
    version  u8   PROTOCOL_VERSION
    type     u8   MsgType
    body     compact UTF-8 JSON object {"run_id", "step", "worker_id", "timings", "meta"}

`unpack_header` bounds the size before parsing anything, checks every field against its message type's
schema (`SCHEMAS`), and raises only `ProtocolError`, whose `reason` is one of `REASONS` (a bounded label set
for the PS's `atomo_ps_dropped_messages_total{reason}` counter). `pack_header` applies the same checks, so
nothing is sent that the peer would reject. What a header that passes holds, so that nothing downstream
sees an unchecked value:

- every number finite; every float within +-MAX_FLOAT (1e300: sums of many of them stay finite); every
  integer within +-2**53 (exact in any JSON reader), except inside RUN's `spec`, which the worker validates
  as a RunSpec (a seed may reach 2**63); timings within [0, MAX_SECONDS];
- every string (keys included) valid Unicode that re-encodes as UTF-8 (no lone surrogates);
- JSON nested at most MAX_DEPTH deep, at most MAX_ITEMS entries per object or array;
- the meta keys of the type's schema, each of its kind and range; `digest` and `digest_step` both or neither.
  Messages the PS receives (REGISTER, GRADIENT, HEARTBEAT) take no other meta key; messages the workers
  receive may carry more keys (generic checks only), so a PS can add one without breaking older workers.

Message types and their meta::

    REGISTER   worker -> PS   {"device", "address", "metrics_port", "pid", "session"} (all optional)
    RUN        PS -> worker   {"spec": RunSpec dict, "shard": i, "num_shards": n, "has_momentum", "compute",
                              "check"}; frames: initial state
    UPDATE     PS -> worker   {"mode": "atoms"|"model", "k", "workers", "lr", "compute", "check"}; frames:
                              encoded messages or dense model; timings {"ps_s"}
    GRADIENT   worker -> PS   {"loss": number in [0, MAX_LOSS] or null (diverged), "digest_step", "digest"}
                              (the PS's run requires "loss");
                              frames: one encoded atomo_core Message per parameter (+ BN buffers)
    HEARTBEAT  both directions, no meta
    STOP       PS -> worker   run over / shutting down; {"reason"}
    REJECT     PS -> worker   e.g. unknown worker, please register; {"reason"}
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
MAGIC = b"ATHD"
MAX_HEADER_BYTES = 65536
MAX_NAME_CHARS = 64
MAX_TIMINGS = 16
MAX_STEP = 2**53  # steps are exact in any JSON reader below this
MAX_INT = 2**53  # any integer in meta (outside RUN's spec)
MAX_SPEC_INT = 2**64  # integers inside RUN's spec (a seed may reach 2**63; RunSpec checks it exactly)
MAX_FLOAT = 1e300  # any float in meta: finite, and sums of many stay finite
MAX_SECONDS = 1e6  # a timing: 0 <= t <= MAX_SECONDS
MAX_LOSS = 1e30  # a worker reports a larger (or non-finite) loss as null: diverged
MAX_DEPTH = 8  # nesting of JSON arrays and objects in meta
MAX_ITEMS = 1024  # entries of one JSON array or object in meta

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
    "bad_field",  # a field out of its bounds or schema (name, step, timing, a meta value, a missing partner)
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
    msg_type = _check_type(header.type)
    body = {
        "run_id": header.run_id,
        "step": header.step,
        "worker_id": header.worker_id,
        "timings": header.timings,
        "meta": header.meta,
    }
    _check_fields(body, msg_type)
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
    _check_fields(body, msg_type)
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


def _check_fields(body: dict, msg_type: MsgType) -> None:
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
        _number(0.0, MAX_SECONDS)(value, f"timing {key!r}")
    meta = body["meta"]
    if not isinstance(meta, dict):
        raise ProtocolError("bad_header", f"meta must be an object, got {type(meta).__name__}")
    _check_meta(meta, msg_type)


# -- meta schemas ------------------------------------------------------------------------------------------

Check = Callable[[object, str], None]  # raises ProtocolError("bad_field") for a value out of its kind or range


def _bad(what: str, why: str) -> ProtocolError:
    return ProtocolError("bad_field", f"{what} {why}"[:300])


def _json(value, what: str, max_int: int = MAX_INT, depth: int = 0) -> None:
    """Any JSON value, bounded: finite numbers in range, valid UTF-8 text, limited depth and size."""
    kind = type(value)
    if value is None or kind is bool:
        return
    if kind is int:
        if not -max_int <= value <= max_int:
            raise _bad(what, f"is an integer beyond +-{max_int}")
    elif kind is float:
        if not (math.isfinite(value) and abs(value) <= MAX_FLOAT):
            raise _bad(what, f"must be a finite number within +-{MAX_FLOAT:g}")
    elif kind is str:
        _utf8(value, what)
    elif kind in (list, tuple, dict):
        if depth >= MAX_DEPTH:
            raise _bad(what, f"is nested deeper than {MAX_DEPTH}")
        if len(value) > MAX_ITEMS:
            raise _bad(what, f"has {len(value)} entries, more than {MAX_ITEMS}")
        items = value.items() if kind is dict else enumerate(value)
        for key, item in items:
            if kind is dict:
                if type(key) is not str:
                    raise _bad(what, f"has a key that is not a string ({type(key).__name__})")
                _utf8(key, f"a key of {what}")
            _json(item, f"{what}[{key!r}]"[:120], max_int, depth + 1)
    else:
        raise _bad(what, f"is not a JSON value ({kind.__name__})")


def _utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from the JSON escape "\ud800"
        raise _bad(what, "is not valid Unicode text (it does not encode as UTF-8)") from exc


def _number(lo: float, hi: float) -> Check:
    def check(value, what: str) -> None:
        if type(value) not in (int, float):
            raise _bad(what, f"must be a number, got {type(value).__name__}")
        try:
            ok = math.isfinite(value) and lo <= value <= hi
        except OverflowError:  # an integer beyond the float range
            ok = False
        if not ok:
            raise _bad(what, f"must be a finite number in [{lo:g}, {hi:g}]")

    return check


def _integer(lo: int, hi: int) -> Check:
    def check(value, what: str) -> None:
        if type(value) is not int or not lo <= value <= hi:
            raise _bad(what, f"must be an integer in [{lo}, {hi}]")

    return check


def _text(max_chars: int) -> Check:
    def check(value, what: str) -> None:
        if type(value) is not str or len(value) > max_chars:
            raise _bad(what, f"must be a string of at most {max_chars} characters")
        _utf8(value, what)

    return check


def _boolean(value, what: str) -> None:
    if type(value) is not bool:
        raise _bad(what, "must be true or false")


def _optional(check: Check) -> Check:
    def optional(value, what: str) -> None:
        if value is not None:
            check(value, what)

    return optional


def _choice(*choices: str) -> Check:
    def check(value, what: str) -> None:
        if value not in choices or type(value) is not str:
            raise _bad(what, f"must be one of {list(choices)}")

    return check


def _names(max_items: int) -> Check:
    def check(value, what: str) -> None:
        if type(value) is not list or len(value) > max_items:
            raise _bad(what, f"must be a list of at most {max_items} names")
        for name in value:
            check_name(name, f"a name in {what}")

    return check


def _spec_object(value, what: str) -> None:
    if type(value) is not dict:
        raise _bad(what, "must be an object")
    _json(value, what, max_int=MAX_SPEC_INT)


@dataclass(frozen=True)
class MetaSchema:
    """The meta of one message type: each known key's check, the keys required, partners (both or neither),
    and whether other keys are allowed (with the generic bounds only)."""

    fields: dict[str, Check]
    required: frozenset[str] = frozenset()
    partners: tuple[tuple[str, str], ...] = ()
    open: bool = False


_REASON = {"reason": _text(256)}
SCHEMAS: dict[MsgType, MetaSchema] = {
    MsgType.REGISTER: MetaSchema(
        {
            "device": _text(32),
            "address": _text(256),
            "metrics_port": _integer(1, 65535),
            "pid": _integer(0, 2**31),
            "session": _text(64),
        }
    ),
    MsgType.HEARTBEAT: MetaSchema({}),
    MsgType.GRADIENT: MetaSchema(
        {"loss": _optional(_number(0.0, MAX_LOSS)), "digest_step": _integer(0, MAX_STEP - 1), "digest": _text(128)},
        partners=(("digest", "digest_step"),),
    ),
    MsgType.RUN: MetaSchema(
        {
            "spec": _spec_object,
            "shard": _integer(0, 2**16),
            "num_shards": _integer(1, 2**16),
            "has_momentum": _boolean,
            "compute": _boolean,
            "check": _boolean,
        },
        required=frozenset({"spec", "shard", "num_shards"}),
        open=True,
    ),
    MsgType.UPDATE: MetaSchema(
        {
            "mode": _choice("atoms", "model"),
            "k": _integer(0, MAX_ITEMS),
            "workers": _names(MAX_ITEMS),
            "lr": _number(0.0, MAX_FLOAT),
            "compute": _boolean,
            "check": _boolean,
        },
        required=frozenset({"mode", "k", "lr"}),
        open=True,
    ),
    MsgType.STOP: MetaSchema(_REASON, open=True),
    MsgType.REJECT: MetaSchema(_REASON, open=True),
}


def _check_meta(meta: dict, msg_type: MsgType) -> None:
    schema = SCHEMAS[msg_type]
    if len(meta) > MAX_ITEMS:
        raise _bad("meta", f"has {len(meta)} keys, more than {MAX_ITEMS}")
    missing = schema.required - meta.keys()
    if missing:
        raise _bad(f"{msg_type.name} meta", f"lacks {sorted(missing)}")
    for first, second in schema.partners:
        if (first in meta) != (second in meta):
            raise _bad(f"{msg_type.name} meta", f"has one of {first!r} and {second!r} without the other")
    for key, value in meta.items():
        if type(key) is not str:
            raise _bad("meta", f"has a key that is not a string ({type(key).__name__})")
        check = schema.fields.get(key)
        if check is not None:
            check(value, f"meta {key!r}"[:80])
        elif schema.open:
            _utf8(key, "a meta key")
            _json(value, f"meta {key!r}"[:80], depth=1)
        else:
            raise _bad(f"{msg_type.name} meta", f"has an unknown key {key[:40]!r}")
