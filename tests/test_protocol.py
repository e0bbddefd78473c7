"""The header frame: round trips, every validation rule, and fuzzing that only ever gives ProtocolError."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.protocol import (
    MAGIC,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    REASONS,
    Header,
    MsgType,
    ProtocolError,
    pack_header,
    unpack_header,
)

names = st.text(alphabet="abcXYZ019_.:@/+=-", max_size=64)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
headers = st.builds(
    Header,
    type=st.sampled_from(MsgType),
    run_id=names,
    step=st.integers(0, 2**53 - 1),
    worker_id=names,
    timings=st.dictionaries(names, st.floats(allow_nan=False, allow_infinity=False), max_size=16),
    meta=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
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
    header = Header(MsgType.GRADIENT, "run-7", 12, "w3", {"compute_s": 0.25, "encode_s": 1}, {"spec": {"lr": 0.1}})
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
    packed = pack_header(Header(MsgType.RUN, meta={"spec": {"x": "y" * 500}}))
    with pytest.raises(ProtocolError) as info:
        unpack_header(packed, max_bytes=100)
    assert info.value.reason == "oversized"


@pytest.mark.parametrize(
    "header, reason",
    [
        (Header(MsgType.RUN, run_id="bad id"), "bad_field"),
        (Header(MsgType.RUN, step=-2), "bad_field"),
        (Header(MsgType.RUN, timings={"t": float("nan")}), "bad_field"),
        (Header(MsgType.RUN, meta={"x": float("inf")}), "bad_field"),
        (Header(MsgType.RUN, meta={"x": object()}), "bad_field"),
        (Header(MsgType.RUN, meta={"x": "y" * MAX_HEADER_BYTES}), "oversized"),
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
@given(st.dictionaries(st.sampled_from(["run_id", "step", "worker_id", "timings", "meta"]), json_values))
def test_fuzz_json_bodies(body):
    try:
        header = unpack_header(raw(body))
    except ProtocolError as exc:
        assert exc.reason in REASONS
    else:
        assert unpack_header(pack_header(header)) == header
