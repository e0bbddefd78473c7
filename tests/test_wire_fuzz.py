"""Hostile bytes through `atomo_core.decode`: the ATOMO codecs and the quantizers (both payload codings) answer
WireFormatError and nothing else."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atomo_core
from atomo_core import Message, WireFormatError, WireLimits, make_codec
from atomo_core.quantizers.bitpack import pack_bits
from atomo_core.wire import CODEC_IDS

# Small limits: a corrupted shape may legitimately ask for up to max_elements zeros.
LIMITS = WireLimits(max_elements=1 << 16)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CODECS = [
    make_codec("entrywise", budget=6),
    make_codec("entrywise", budget=3, atom_dtype="float16"),
    make_codec("fourier", budget=6),
    make_codec("svd", budget=2),
    make_codec("svd", budget=2, reshape="paper", atom_dtype="float16"),
    make_codec("svd", budget=3, basis="warm", rank=2),  # 6 x 18 view, n = 6 > 2 r: top atoms and residual rows
    make_codec("svd", budget=2, reshape="paper", atom_dtype="float16", basis="warm", rank=1),
    make_codec("qsgd", bits=4, coding="fixed"),
    make_codec("qsgd", bits=2, bucket_size=16, coding="elias"),
    make_codec("terngrad"),
    make_codec("lq", q=2.0, coding="fixed"),
    make_codec("lq", q=2.0, coding="elias"),
]


def valid_messages() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 3, generator=g) * torch.linspace(0.1, 3, 3)
    return [bytes(codec.encode(x, torch.Generator().manual_seed(i))) for i, codec in enumerate(CODECS)]


VALID = valid_messages()


def decodes_or_rejects(data: bytes) -> None:
    """Either a tensor of the header's shape, or WireFormatError; any other exception fails the test."""
    try:
        estimate = atomo_core.decode(data, LIMITS)
    except WireFormatError:
        return
    assert isinstance(estimate, torch.Tensor)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    decodes_or_rejects(data)


@FUZZ
@given(st.sampled_from(["entrywise", "fourier", "svd", "qsgd", "terngrad", "lq"]), st.binary(min_size=8, max_size=400))
def test_random_bytes_after_a_valid_fixed_header(codec, tail):
    head = struct.pack("<4sBBBBBBH", b"ATMO", 1, CODEC_IDS[codec], 0, tail[0] % 5, tail[1] % 4, tail[2] % 6, 0)
    decodes_or_rejects(head + tail[3:])


@FUZZ
@given(
    st.sampled_from(range(len(VALID))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_corrupted_valid_messages(which, edits):
    data = bytearray(VALID[which])
    for position, value in edits:
        data[position % len(data)] = value
    decodes_or_rejects(bytes(data))


@FUZZ
@given(st.sampled_from(range(len(VALID))), st.integers(0, 10_000), st.binary(max_size=24))
def test_truncated_and_extended_valid_messages(which, cut, extra):
    data = VALID[which]
    decodes_or_rejects(data[: cut % len(data)])
    decodes_or_rejects(data + extra)


def test_valid_messages_decode():
    for data in VALID:
        assert atomo_core.decode(data, LIMITS).shape == (6, 2, 3, 3)


def replace_section(data: bytes, index: int, section: torch.Tensor) -> bytes:
    msg = atomo_core.wire.decode_message(data)
    sections = list(msg.sections)
    sections[index] = section
    return bytes(Message(msg.codec_id, msg.shape, msg.dtype, msg.params, sections))


def sparse_message(**replacements) -> bytes:
    data = bytes(make_codec("entrywise", budget=4).encode(torch.arange(1.0, 9.0), torch.Generator().manual_seed(0)))
    for index, section in replacements.items():
        data = replace_section(data, int(index[1:]), section)
    return data


@pytest.mark.parametrize(
    "data,problem",
    [
        (sparse_message(s0=torch.tensor([1, 9], dtype=torch.int32), s1=torch.zeros(1, dtype=torch.uint8)), "range"),
        (
            sparse_message(s0=torch.tensor([3, 1], dtype=torch.int32), s1=torch.zeros(1, dtype=torch.uint8)),
            "increasing",
        ),
        (sparse_message(s0=torch.tensor([-1], dtype=torch.int32), s1=torch.zeros(1, dtype=torch.uint8)), "range"),
        (sparse_message(s0=torch.arange(9, dtype=torch.int32), s1=torch.zeros(2, dtype=torch.uint8)), "atoms"),
        (sparse_message(s1=torch.zeros(5, dtype=torch.uint8)), "sign bytes"),
        (sparse_message(s2=torch.tensor([float("inf")], dtype=torch.float64)), "non-finite"),
        (sparse_message(s2=torch.tensor([-1.0], dtype=torch.float64)), "negative scale"),
        (sparse_message(s2=torch.tensor([1.0], dtype=torch.float32)), "dtypes"),
        (sparse_message(s3=torch.tensor([0], dtype=torch.int32)), "values"),
    ],
)
def test_sparse_sections_are_validated(data, problem):
    with pytest.raises(WireFormatError, match=problem):
        atomo_core.decode(data)


def svd_message(**replacements) -> bytes:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    data = bytes(make_codec("svd", budget=4).encode(x))  # s = rank: all 4 atoms
    for index, section in replacements.items():
        data = replace_section(data, int(index[1:]), section)
    return data


@pytest.mark.parametrize(
    "data,problem",
    [
        (svd_message(s0=torch.ones(5), s1=torch.ones(20), s2=torch.ones(30)), "at most 4"),
        (svd_message(s1=torch.ones(15)), "factor entries"),
        (svd_message(s2=torch.ones(25)), "factor entries"),
        (svd_message(s0=torch.tensor([1.0, float("nan"), 1.0, 1.0])), "non-finite"),
        (svd_message(s2=torch.ones(24, dtype=torch.float16)), "dtypes"),
    ],
)
def test_svd_sections_are_validated(data, problem):
    with pytest.raises(WireFormatError, match=problem):
        atomo_core.decode(data)


@pytest.mark.parametrize(
    "name,params,problem",
    [
        ("svd", (2.0, 5.0, 0.0), "reshape code"),
        ("svd", (2.0, 0.0, 7.0), "atom dtype code"),
        ("svd", (2.0,), "2 decomposition parameters"),
        ("entrywise", (-1.0, 0.0), "budget"),
        ("fourier", (), "budget"),
        ("fourier", (3.0, 0.5), "atom dtype code"),
        ("qsgd", (0.0, 512.0), "bits must be an integer"),
        ("qsgd", (17.0, 512.0), "bits must be an integer"),
        ("qsgd", (2.5, 512.0), "bits must be an integer"),
        ("qsgd", (4.0, 0.5), "bucket_size"),
        ("qsgd", (4.0,), "2 parameters"),
        ("lq", (-1.0,), "q >= 0"),
        ("terngrad", (-2.0,), "clip >= 0"),
    ],
)
def test_header_parameters_are_validated(name, params, problem):
    msg = Message(CODEC_IDS[name], (4,), torch.float32, params, [])
    with pytest.raises(WireFormatError, match=problem):
        atomo_core.decode(bytes(msg))


def test_empty_tensors_round_trip():
    for codec in CODECS:
        for shape in [(0,), (3, 0), (0, 2, 3, 3)]:
            x = torch.zeros(shape)
            assert atomo_core.decode(bytes(codec.encode(x))).shape == shape


def test_nan_in_a_payload_is_rejected():
    data = bytearray(VALID[3])
    payload_start = len(atomo_core.wire.decode_message(VALID[3]).header())
    data[payload_start : payload_start + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(WireFormatError, match="non-finite"):
        atomo_core.decode(bytes(data))


QSGD_X = torch.cat([torch.zeros(5), torch.tensor([1.0]), torch.zeros(14), torch.tensor([-0.5]), torch.zeros(21)])


def qsgd_message(coding: str = "fixed", bits: int = 2, params=None, x=None, **replacements) -> bytes:
    """42 entries in buckets of 16 (3 bits per fixed field: 126 bits, 2 of them padding)."""
    codec = make_codec("qsgd", bits=bits, bucket_size=16, coding=coding)
    x = torch.randn(42, generator=torch.Generator().manual_seed(0)) if x is None else x
    msg = codec.encode(x, torch.Generator().manual_seed(1))
    assert int(msg.sections[1][0]) == (0 if coding == "fixed" else 1)
    msg.params = msg.params if params is None else params
    data = bytes(msg)
    for index, section in replacements.items():
        data = replace_section(data, int(index[1:]), section)
    return data


def qsgd_section(index: int, **kwargs) -> torch.Tensor:
    return atomo_core.wire.decode_message(qsgd_message(**kwargs)).sections[index].clone()


def with_padding_bit() -> torch.Tensor:
    payload = qsgd_section(2)
    payload[-1] |= 1
    return payload


def sign_on_a_zero_level() -> torch.Tensor:
    words = torch.zeros(42, dtype=torch.int32)
    words[7] = 0b100  # sign bit, level 0
    return pack_bits(words, 3)


def meta(coding: int, nonzeros: int) -> torch.Tensor:
    return torch.tensor([coding, nonzeros], dtype=torch.int64)


def norms_with(first: float) -> torch.Tensor:
    norms = qsgd_section(0)
    norms[0] = first
    return norms


@pytest.mark.parametrize(
    "data,problem",
    [
        (qsgd_message(s2=torch.zeros(15, dtype=torch.uint8)), "payload bytes"),
        (qsgd_message(s2=qsgd_section(2)[:-1]), "payload bytes"),  # truncated
        (qsgd_message(s2=torch.zeros(17, dtype=torch.uint8)), "payload bytes"),
        (qsgd_message(params=(1.0, 16.0)), "payload bytes"),  # a bit width that does not match the payload
        (qsgd_message(params=(3.0, 16.0)), "payload bytes"),
        (qsgd_message(s2=with_padding_bit()), "padding"),
        (qsgd_message(s1=meta(0, 0), s2=sign_on_a_zero_level()), "sign bit set on a zero level"),
        (qsgd_message(s1=meta(0, 41)), "nonzero levels differ"),
        (qsgd_message(s1=meta(0, 43)), "43 nonzeros for 42"),
        (qsgd_message(s1=meta(2, 3)), "unknown payload coding"),
        (qsgd_message(s0=norms_with(0.0)), "bucket of norm 0"),
        (qsgd_message(s0=norms_with(-1.0)), "finite and non-negative"),
        (qsgd_message(s0=norms_with(float("nan"))), "finite and non-negative"),
        (qsgd_message(s0=torch.ones(2)), "do not match"),
        (qsgd_message(s2=torch.zeros(16, dtype=torch.int8)), "do not match"),
        (qsgd_message("elias", bits=3, x=QSGD_X, params=(2.0, 16.0)), "level 7 exceeds s = 3"),
        (qsgd_message("elias", x=QSGD_X, s2=qsgd_section(2, coding="elias", x=QSGD_X)[:-1]), "Elias stream"),
        (qsgd_message("elias", x=QSGD_X, s1=meta(1, 0)), "trailing bytes"),
        (qsgd_message("elias", x=QSGD_X, s1=meta(1, 40)), "Elias stream"),
    ],
)
def test_qsgd_sections_are_validated(data, problem):
    with pytest.raises(WireFormatError, match=problem):
        atomo_core.decode(data)


def ternary_message(name: str = "terngrad", **replacements) -> bytes:
    """10 entries: 3 payload bytes, the last with two 2-bit fields of padding."""
    codec = make_codec(name, **({"coding": "fixed"} if name == "lq" else {}))
    data = bytes(codec.encode(torch.linspace(-1, 1, 10), torch.Generator().manual_seed(0)))
    for index, section in replacements.items():
        data = replace_section(data, int(index[1:]), section)
    return data


def ternary_payload(*codes: int) -> torch.Tensor:
    return pack_bits(torch.tensor(codes + (0,) * (12 - len(codes))), 2)


@pytest.mark.parametrize("name", ["terngrad", "lq"])
@pytest.mark.parametrize(
    "replacements,problem",
    [
        ({"s2": torch.zeros(2, dtype=torch.uint8)}, "payload bytes"),
        ({"s1": meta(0, 1), "s2": ternary_payload(2)}, "invalid 2-bit code"),
        ({"s1": meta(0, 1), "s2": ternary_payload(1, *[0] * 10, 1)}, "padding"),
        ({"s1": meta(0, 2), "s2": ternary_payload(1, 3, 1)}, "different number of nonzeros"),
        ({"s0": torch.zeros(1), "s1": meta(0, 1), "s2": ternary_payload(1)}, "zero scale"),
        ({"s0": torch.tensor([-1.0])}, "finite and non-negative"),
        ({"s0": torch.tensor([float("inf")])}, "finite and non-negative"),
        ({"s1": meta(5, 1)}, "unknown payload coding"),
    ],
)
def test_ternary_sections_are_validated(name, replacements, problem):
    with pytest.raises(WireFormatError, match=problem):
        atomo_core.decode(ternary_message(name, **replacements))


def test_sparse_ternary_coding_is_refused_by_terngrad():
    sparse = ternary_message("lq", s1=meta(1, 0), s2=torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(WireFormatError):
        atomo_core.decode(sparse)  # lq: an Elias stream of 0 codes must be empty
    data = bytearray(sparse)
    data[5] = CODEC_IDS["terngrad"]
    with pytest.raises(WireFormatError, match="unknown payload coding 1"):
        atomo_core.decode(bytes(data))
