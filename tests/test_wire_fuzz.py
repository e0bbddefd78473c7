"""Hostile bytes through `atomo_core.decode`: the ATOMO codecs answer WireFormatError and nothing else."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atomo_core
from atomo_core import Message, WireFormatError, WireLimits, make_codec
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
@given(st.sampled_from(["entrywise", "fourier", "svd"]), st.binary(min_size=8, max_size=400))
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
