"""The header frame: round trips, every validation rule, and fuzzing that only ever gives ProtocolError."""

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.protocol import (
    MAGIC,
    MAX_DEPTH,
    MAX_FLOAT,
    MAX_HEADER_BYTES,
    MAX_INT,
    MAX_ITEMS,
    MAX_LOSS,
    MAX_SECONDS,
    PROTOCOL_VERSION,
    REASONS,
    SCHEMAS,
    Header,
    MsgType,
    ProtocolError,
    pack_header,
    unpack_header,
)

names = st.text(alphabet="abcXYZ019_.:@/+=-", max_size=64)


def json_values(max_int: int = MAX_INT):
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-max_int, max_int)
        | st.floats(-MAX_FLOAT, MAX_FLOAT)
        | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )


extras = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("spec", "mode", "k", "lr")), json_values())
digests = st.fixed_dictionaries({"digest": st.text(max_size=32), "digest_step": st.integers(0, 2**53 - 1)})
# Valid meta of each type: its schema's fields (and, where the schema is open, other keys).
METAS = {
    MsgType.REGISTER: st.fixed_dictionaries(
        {},
        optional={
            "device": st.text(max_size=32),
            "address": st.text(max_size=64),
            "metrics_port": st.integers(1, 65535),
            "pid": st.integers(0, 2**31),
        },
    ),
    MsgType.HEARTBEAT: st.just({}),
    MsgType.GRADIENT: st.fixed_dictionaries({}, optional={"loss": st.none() | st.floats(0, MAX_LOSS)})
    | st.tuples(st.fixed_dictionaries({"loss": st.floats(0, 1e3)}), digests).map(lambda t: t[0] | t[1]),
    MsgType.RUN: st.tuples(
        st.fixed_dictionaries(
            {
                "spec": st.dictionaries(st.text(max_size=8), json_values(2**63), max_size=6),
                "shard": st.integers(0, 255),
                "num_shards": st.integers(1, 256),
            },
            optional={"compute": st.booleans(), "check": st.booleans(), "has_momentum": st.booleans()},
        ),
        extras,
    ).map(lambda t: t[1] | t[0]),
    MsgType.UPDATE: st.fixed_dictionaries(
        {"mode": st.sampled_from(["atoms", "model"]), "k": st.integers(0, 64), "lr": st.floats(0, 10)},
        optional={"workers": st.lists(names, max_size=8), "compute": st.booleans(), "check": st.booleans()},
    ),
    MsgType.STOP: st.tuples(st.fixed_dictionaries({}, optional={"reason": st.text(max_size=40)}), extras).map(
        lambda t: t[1] | t[0]
    ),
    MsgType.REJECT: st.fixed_dictionaries({}, optional={"reason": st.text(max_size=40)}),
}
headers = st.sampled_from(MsgType).flatmap(
    lambda kind: st.builds(
        Header,
        type=st.just(kind),
        run_id=names,
        step=st.integers(0, 2**53 - 1),
        worker_id=names,
        timings=st.dictionaries(names, st.floats(0, MAX_SECONDS), max_size=16),
        meta=METAS[kind],
    )
)


def raw(body: dict | bytes, type_code: int = 4, version: int = PROTOCOL_VERSION, magic: bytes = MAGIC) -> bytes:
    text = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack("<4sBB", magic, version, type_code) + text


def valid_body(**changes) -> dict:
    return {"run_id": "r1", "step": 3, "worker_id": "w0", "timings": {}, "meta": {}} | changes


@settings(max_examples=300, deadline=None)
@given(headers)
def test_round_trip(header):
    assert unpack_header(pack_header(header)) == header


def test_round_trip_from_memoryview_and_bytearray():
    header = Header(MsgType.GRADIENT, "run-7", 12, "w3", {"compute_s": 0.25, "encode_s": 1}, {"loss": 2})
    packed = pack_header(header)
    assert packed.startswith(MAGIC + bytes([PROTOCOL_VERSION, MsgType.GRADIENT]))
    for buf in (memoryview(packed), bytearray(packed)):
        assert unpack_header(buf) == header
    assert unpack_header(packed).timings == {"compute_s": 0.25, "encode_s": 1.0}
    assert len(pack_header(Header(MsgType.HEARTBEAT))) < 80  # small on the wire


@pytest.mark.parametrize(
    "buf, reason",
    [
        (b"", "bad_header"),
        (b"ATH", "bad_header"),
        (raw(valid_body(), magic=b"ATMO"), "bad_header"),
        (raw(valid_body(), version=PROTOCOL_VERSION + 1), "bad_version"),
        (raw(valid_body(), type_code=0), "unknown_type"),
        (raw(valid_body(), type_code=99), "unknown_type"),
        (raw(b"{not json"), "bad_header"),
        (raw(b"\xff\xfe"), "bad_header"),
        (raw(b"[1, 2]"), "bad_header"),
        (raw(b'{"run_id": "", "step": NaN, "worker_id": "", "timings": {}, "meta": {}}'), "bad_header"),
        (raw(b"[" * 50000 + b"]" * 50000), "oversized"),
        (raw(b"[" * 30000 + b"]" * 30000), "bad_header"),
        (raw({k: v for k, v in valid_body().items() if k != "meta"}), "bad_header"),
        (raw(valid_body(extra=1)), "bad_header"),
        (raw(valid_body(run_id="x" * 65)), "bad_field"),
        (raw(valid_body(worker_id="w 0")), "bad_field"),
        (raw(valid_body(worker_id="w\n0")), "bad_field"),
        (raw(valid_body(worker_id=7)), "bad_header"),
        (raw(valid_body(step=-1)), "bad_field"),
        (raw(valid_body(step=2**53)), "bad_field"),
        (raw(valid_body(step=1.5)), "bad_header"),
        (raw(valid_body(step=True)), "bad_header"),
        (raw(valid_body(step="3")), "bad_header"),
        (raw(valid_body(timings=[1.0])), "bad_header"),
        (raw(valid_body(timings={"a": "1"})), "bad_header"),
        (raw(valid_body(timings={"a": True})), "bad_header"),
        (raw(valid_body(timings={"a": 10**400})), "bad_field"),
        (raw(valid_body(timings={f"t{i}": 1.0 for i in range(17)})), "bad_field"),
        (raw(valid_body(meta=[])), "bad_header"),
        (raw(valid_body(meta="x" * MAX_HEADER_BYTES)), "oversized"),
        (b"\x00" * (MAX_HEADER_BYTES + 1), "oversized"),
        (12345, "bad_header"),
        ("a string", "bad_header"),
    ],
)
def test_rejects(buf, reason):
    with pytest.raises(ProtocolError) as info:
        unpack_header(buf)
    assert info.value.reason == reason
    assert str(info.value)


def test_reject_infinite_timing_written_by_another_encoder():
    body = b'{"run_id":"","step":0,"worker_id":"","timings":{"a":Infinity},"meta":{}}'
    with pytest.raises(ProtocolError) as info:
        unpack_header(raw(body))
    assert info.value.reason == "bad_header"


def test_max_bytes_is_checked_before_parsing():
    packed = pack_header(Header(MsgType.STOP, meta={"reason": "y" * 200}))
    with pytest.raises(ProtocolError) as info:
        unpack_header(packed, max_bytes=100)
    assert info.value.reason == "oversized"


@pytest.mark.parametrize(
    "header, reason",
    [
        (Header(MsgType.STOP, run_id="bad id"), "bad_field"),
        (Header(MsgType.STOP, step=-2), "bad_field"),
        (Header(MsgType.STOP, timings={"t": float("nan")}), "bad_field"),
        (Header(MsgType.STOP, meta={"x": float("inf")}), "bad_field"),
        (Header(MsgType.STOP, meta={"x": object()}), "bad_field"),
        (Header(MsgType.STOP, meta={"x": "\ud800"}), "bad_field"),
        (Header(MsgType.STOP, meta={"x": "y" * MAX_HEADER_BYTES}), "oversized"),
        (Header(MsgType.RUN, meta={"shard": 0, "num_shards": 1}), "bad_field"),  # no spec
        (Header(MsgType.GRADIENT, meta={"loss": 1.0, "digest": "ab"}), "bad_field"),  # no digest_step
        (Header(42), "unknown_type"),
    ],
)
def test_pack_refuses_what_the_peer_would_reject(header, reason):
    with pytest.raises(ProtocolError) as info:
        pack_header(header)
    assert info.value.reason == reason


def test_error_reasons_are_a_closed_set():
    with pytest.raises(ValueError):
        ProtocolError("anything goes", "message")
    assert len(REASONS) == len(set(REASONS))


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(buf):
    for candidate in (buf, MAGIC + bytes([PROTOCOL_VERSION, 4]) + buf):
        try:
            unpack_header(candidate)
        except ProtocolError as exc:
            assert exc.reason in REASONS


@settings(max_examples=500, deadline=None)
@given(headers, st.data())
def test_fuzz_corrupted_headers(header, data):
    packed = bytearray(pack_header(header))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(packed) - 1))
        packed[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(packed)))
    for candidate in (bytes(packed), bytes(packed[:cut])):
        try:
            unpack_header(candidate)
        except ProtocolError as exc:
            assert exc.reason in REASONS


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["run_id", "step", "worker_id", "timings", "meta"]), json_values()))
def test_fuzz_json_bodies(body):
    try:
        header = unpack_header(raw(body))
    except ProtocolError as exc:
        assert exc.reason in REASONS
    else:
        assert unpack_header(pack_header(header)) == header


def body_of(kind: MsgType, meta=None, timings=None) -> bytes:
    """A header frame as any encoder could write it (no checks on the way out)."""
    return raw(valid_body(meta=meta or {}, timings=timings or {}), type_code=int(kind))


@pytest.mark.parametrize(
    "kind, text, what",
    [
        # values at the edges of JSON and floats inside otherwise valid headers
        (MsgType.GRADIENT, '{"loss": 1}', None),
        (MsgType.HEARTBEAT, "{}", None),
        (MsgType.GRADIENT, '{"loss": 1.7976931348623157e308}', "loss"),
        (MsgType.GRADIENT, '{"loss": -0.5}', "loss"),
        (MsgType.GRADIENT, '{"loss": 1e400}', "loss"),
        (MsgType.GRADIENT, '{"loss": "1"}', "loss"),
        (MsgType.GRADIENT, '{"loss": true}', "loss"),
        (MsgType.GRADIENT, '{"loss": 1, "digest": "ab"}', "without the other"),
        (MsgType.GRADIENT, '{"loss": 1, "digest_step": 3}', "without the other"),
        (MsgType.GRADIENT, '{"loss": 1, "digest": "ab", "digest_step": 9007199254740993}', "digest_step"),
        (MsgType.GRADIENT, '{"loss": 1, "extra": 1}', "unknown key"),
        (MsgType.REGISTER, '{"address": "\\ud800"}', "UTF-8"),
        (MsgType.REGISTER, '{"device": "' + "x" * 33 + '"}', "device"),
        (MsgType.REGISTER, '{"metrics_port": 70000}', "metrics_port"),
        (MsgType.REGISTER, '{"pid": 1e3}', "pid"),
        (MsgType.REGISTER, '{"pid": -1}', "pid"),
        (MsgType.HEARTBEAT, '{"x": 1}', "unknown key"),
        (MsgType.STOP, '{"\\udc80": 1}', "UTF-8"),
        (MsgType.STOP, '{"n": 9007199254740993}', "beyond"),
        (MsgType.STOP, '{"n": -9007199254740993}', "beyond"),
        (MsgType.STOP, '{"n": 1e301}', "finite"),
        (MsgType.STOP, '{"n": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}", "deeper"),
        (MsgType.STOP, '{"n": [' + ",".join(["0"] * (MAX_ITEMS + 1)) + "]}", "entries"),
        (MsgType.UPDATE, '{"mode": "atoms", "k": 1, "lr": 0.1, "workers": ["a b"]}', "workers"),
        (MsgType.UPDATE, '{"mode": "both", "k": 1, "lr": 0.1}', "mode"),
        (MsgType.UPDATE, '{"mode": "atoms", "k": 1}', "lacks"),
        (MsgType.RUN, '{"spec": {"seed": 9223372036854775807}, "shard": 0, "num_shards": 1}', None),
        (MsgType.RUN, '{"spec": {"seed": 36893488147419103232}, "shard": 0, "num_shards": 1}', "beyond"),
        (MsgType.RUN, '{"spec": [], "shard": 0, "num_shards": 1}', "spec"),
    ],
)
def test_meta_is_checked_against_its_type_schema(kind, text, what):
    buf = body_of(kind)[: -len(b"{}}")] + text.encode() + b"}"
    if what is None:
        assert unpack_header(buf).meta == json.loads(text)
        return
    with pytest.raises(ProtocolError) as info:
        unpack_header(buf)
    assert info.value.reason == "bad_field" and what in str(info.value)


@pytest.mark.parametrize("value", [1.7976931348623157e308, 1e6 + 1, -1e-9, 10**400])
def test_timings_are_finite_and_bounded(value):
    with pytest.raises(ProtocolError) as info:
        unpack_header(body_of(MsgType.GRADIENT, timings={"compute_s": value}))
    assert info.value.reason == "bad_field"
    assert unpack_header(body_of(MsgType.GRADIENT, timings={"compute_s": MAX_SECONDS})).timings == {
        "compute_s": MAX_SECONDS
    }


def test_every_message_type_has_a_schema():
    assert set(SCHEMAS) == set(MsgType)
    for schema in SCHEMAS.values():
        assert schema.required <= schema.fields.keys()
        assert all(a in schema.fields and b in schema.fields for a, b in schema.partners)


@settings(max_examples=300, deadline=None)
@given(headers)
def test_accepted_headers_hold_only_bounded_values(header):
    """What unpack_header returns re-encodes as strict UTF-8 JSON (no NaN, no surrogates) and sums safely."""
    got = unpack_header(pack_header(header))
    json.dumps(got.meta, allow_nan=False).encode("utf-8")
    assert math.isfinite(sum(got.timings.values()) * 1000)
