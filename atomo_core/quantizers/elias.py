"""Elias omega ("recursive") codes for arrays of positive integers, vectorized (QSGD, Alistarh et al. 2017, Sec. 3.1).

Elias omega writes k >= 2 as groups `bin(N_d) ... bin(N_1) bin(k) 0` with N_1 = bitlen(k) - 1,
N_2 = bitlen(N_1) - 1, ..., down to a group of two bits; k = 1 is the single bit `0`. Every group starts
with a 1 and the final 0 ends the code, so |omega(k)| = bitlen(k) + |omega(bitlen(k) - 1)|, |omega(1)| = 1.

A concatenation of omega codes can only be split by walking it group by group, which is far too slow in
Python for millions of codes. We store exactly the same bits in another order ("depth-major"), so that
an array of codes decodes in one vectorized pass per recursion level:

1. the depth stream: for each code, its number of groups d in unary (d ones, then the terminating 0);
   these are the groups' leading 1 bits and the code's final 0;
2. level 1: for each code with d >= 1, its innermost group without its leading 1 (1 bit);
   level j: for each code with d >= j, its j-th group from the inside without its leading 1
   (N bits, N = the value of its group at level j - 1).

Each code keeps its omega length exactly; the depth stream and the levels are each padded to a whole
byte (at most 14 bits per array of codes), so bit counts (and QSGD's bound) are otherwise unchanged.
Values are limited to [1, 2**32): at most 4 levels, and a decoder rejects any group longer than 32 bits.

The levels are built from (value, length) fields, most significant bit first, packed 64 bits at a time.
"""

from __future__ import annotations

import numpy as np

from atomo_core.wire import WireFormatError

MAX_VALUE = 1 << 32
MAX_DEPTH = 4  # groups of a value < 2**32: 32 bits -> 5 bits -> 3 bits -> 2 bits
_MAX_MANTISSA = 31
_CHUNK = 1 << 20
PADDING_BITS = 21  # most padding in `encode_signed`: signs, depth stream and levels each end on a byte


def _omega_groups(k: int) -> list[int]:
    """The omega groups of k, outermost first (empty for k = 1)."""
    return [k] + _omega_groups(k.bit_length() - 1) if k > 1 else []


# For N = bitlen(k) - 1 <= 32: the groups of N outermost first (0-padded), their number, their total bits,
# and each group's mantissa bits (its bit length - 1).
_INNER = np.array([(_omega_groups(n) + [0, 0, 0])[:3] for n in range(33)], dtype=np.int64)
_INNER_DEPTH = np.array([len(_omega_groups(n)) for n in range(33)], dtype=np.int64)
_INNER_BITS = np.array([sum(g.bit_length() for g in _omega_groups(n)) for n in range(33)], dtype=np.int64)
_INNER_MANTISSA_BITS = np.maximum(np.frexp(_INNER.astype(np.float64))[1] - 1, 0)


def bit_length(values: np.ndarray) -> np.ndarray:
    """floor(log2(v)) + 1 for integers 1 <= v < 2**53 (exact: frexp reads the float's exponent)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _check_values(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 1 or values.max() >= MAX_VALUE):
        raise ValueError(f"Elias omega codes here take integers in [1, 2**32), got [{values.min()}, {values.max()}]")
    return values


def omega_lengths(values: np.ndarray) -> np.ndarray:
    """|omega(k)| for each value: bitlen(k) + the bits of the groups of bitlen(k) - 1, plus the final 0."""
    inner = bit_length(_check_values(values)) - 1
    return np.where(inner > 0, inner + 1 + _INNER_BITS[inner] + 1, 1)


def omega_encode(values: np.ndarray) -> np.ndarray:
    """The depth-major omega code of `values` as bytes: the depth stream, then the levels, each byte-padded."""
    values = _check_values(values)
    inner = bit_length(values) - 1
    depth = np.where(inner > 0, 1 + _INNER_DEPTH[inner], 0)
    unary = np.ones(int(depth.sum()) + depth.size, dtype=np.uint8)  # d ones, then the terminating 0
    unary[np.cumsum(depth + 1) - 1] = 0
    mantissas, mantissa_bits = [], []
    for level in range(1, int(depth.max(initial=0)) + 1):
        (codes,) = np.nonzero(depth >= level)
        outer = depth[codes] - level  # 0: the value itself; i >= 1: group i - 1 of its N_1 = inner
        table = (inner[codes], np.maximum(outer - 1, 0))
        group = np.where(outer == 0, values[codes], _INNER[table])
        bits = np.where(outer == 0, inner[codes], _INNER_MANTISSA_BITS[table])
        mantissas.append(group - (np.int64(1) << bits))
        mantissa_bits.append(bits)
    levels = pack_fields(np.concatenate(mantissas), np.concatenate(mantissa_bits)) if mantissas else unary[:0]
    return np.concatenate([np.packbits(unary), levels])


def pack_fields(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate the fields (lengths 1..32, values < 2**length) into bytes, most significant bit first."""
    ends = np.cumsum(lengths, dtype=np.int64)
    total = int(ends[-1]) if ends.size else 0
    words = np.zeros(total // 64 + 1, dtype=np.uint64)
    for start in range(0, values.size, _CHUNK):  # chunks keep the temporaries small and cached
        chunk = slice(start, start + _CHUNK)
        _or_fields(words, values[chunk], lengths[chunk], ends[chunk] - lengths[chunk])
    return words.astype(">u8").view(np.uint8)[: -(-total // 8)]


def _or_fields(words: np.ndarray, values: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> None:
    values, lengths, offsets = values.astype(np.uint64), lengths.astype(np.uint64), offsets.astype(np.uint64)
    word, end_in_word = offsets >> np.uint64(6), (offsets & np.uint64(63)) + lengths
    fits = end_in_word <= 64
    head = np.where(
        fits,
        values << np.where(fits, np.uint64(64) - end_in_word, 0).astype(np.uint64),
        values >> np.where(fits, 0, end_in_word - np.uint64(64)).astype(np.uint64),
    )
    starts = np.flatnonzero(np.diff(word, prepend=~word[0]))
    words[word[starts]] |= np.bitwise_or.reduceat(head, starts)
    (split,) = np.nonzero(~fits)  # fields that run into the next word: at most one per word
    words[word[split] + np.uint64(1)] |= values[split] << (np.uint64(128) - end_in_word[split])


def read_fields(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The fields (lengths 1..32) at the given bit offsets of `data` (callers check them against its size)."""
    padded = np.zeros(8 * (data.size // 8 + 2), dtype=np.uint8)
    padded[: data.size] = data
    words = padded.view(">u8").astype(np.uint64)
    offsets = offsets.astype(np.uint64)
    word, shift = offsets >> np.uint64(6), offsets & np.uint64(63)
    window = (words[word] << shift) | ((words[word + np.uint64(1)] >> np.uint64(1)) >> (np.uint64(63) - shift))
    return (window >> (np.uint64(64) - lengths.astype(np.uint64))).astype(np.int64)


def omega_decode(data: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Decode `count` codes of `omega_encode` from the start of the bytes `data`; returns (values, bytes used).

    Every read is checked against the buffer, so a malformed stream raises WireFormatError and the work
    is bounded by the buffer size (one vectorized pass per level, at most MAX_DEPTH).
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    if count > 8 * data.size:
        raise WireFormatError(f"Elias stream: {count} codes need at least {count} bits, {8 * data.size} left")
    bits = np.unpackbits(data, count=min(8 * data.size, count * (MAX_DEPTH + 1)))
    (zeros,) = np.nonzero(bits == 0)
    if zeros.size < count:
        raise WireFormatError(f"Elias stream: fewer than {count} codes in the depth stream")
    ends = zeros[:count]
    depth = np.diff(ends, prepend=-1) - 1
    if depth.max() > MAX_DEPTH:
        raise WireFormatError(f"Elias stream: a code of {depth.max()} groups exceeds {MAX_DEPTH}")
    unary_bits = int(ends[-1]) + 1
    check_padding(data, unary_bits)
    levels = data[-(-unary_bits // 8) :]
    position = 0
    values = np.ones(count, dtype=np.int64)
    for level in range(1, int(depth.max()) + 1):
        (codes,) = np.nonzero(depth >= level)
        lengths = values[codes]
        if lengths.max() > _MAX_MANTISSA:
            raise WireFormatError(f"Elias stream: a group of {lengths.max() + 1} bits exceeds 32")
        total = int(lengths.sum())
        if position + total > 8 * levels.size:
            raise WireFormatError(f"Elias stream: level {level} needs {total} bits, {8 * levels.size - position} left")
        offsets = position + np.cumsum(lengths) - lengths
        values[codes] = (np.int64(1) << lengths) | read_fields(levels, offsets, lengths)
        position += total
    check_padding(levels, position)
    return values, -(-unary_bits // 8) + -(-position // 8)


def check_padding(data: np.ndarray, nbits: int) -> None:
    """The bits after the first `nbits` of their last byte must be zero (one encoding per message)."""
    if nbits % 8 and data[nbits // 8] & (0xFF >> (nbits % 8)):
        raise WireFormatError(f"bit stream of {nbits} bits has nonzero padding")


def encode_signed(negative: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A sparse payload: one sign bit per nonzero (byte-padded), then the omega codes of `values`."""
    return np.concatenate([np.packbits(negative), omega_encode(values)])


def decode_signed(data: np.ndarray, signs: int, codes: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `encode_signed` with `signs` sign bits and `codes` values; the payload must end there."""
    sign_bytes = -(-signs // 8)
    if sign_bytes > data.size:
        raise WireFormatError(f"sparse payload of {data.size} bytes is shorter than its {sign_bytes} sign bytes")
    check_padding(data, signs)
    values, used = omega_decode(data[sign_bytes:], codes)
    if sign_bytes + used != data.size:
        raise WireFormatError(f"sparse payload has {data.size - sign_bytes - used} trailing bytes")
    return np.unpackbits(data, count=signs).astype(bool), values
