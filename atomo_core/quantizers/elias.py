"""Elias omega ("recursive") codes for arrays of positive integers, vectorized (QSGD, Alistarh et al. 2017, Sec. 3.1).

Elias omega writes k >= 2 as groups `bin(N_d) ... bin(N_1) bin(k) 0` with N_1 = bitlen(k) - 1,
N_2 = bitlen(N_1) - 1, ..., down to a group of two bits; k = 1 is the single bit `0`. Every group starts
with a 1 and the final 0 ends the code, so a code with groups g has 1 + sum(bitlen(g)) bits.

A concatenation of omega codes can only be split by walking it group by group, which is far too slow in
Python for millions of codes. We store exactly the same bits in another order ("depth-major"), so that
an array of codes decodes in one vectorized pass per recursion level:

1. the depth stream: for each code, its number of groups d in unary (d ones, then the terminating 0);
   these are the groups' leading 1 bits and the code's final 0;
2. level 1: for each code with d >= 1, its innermost group without its leading 1 (1 bit);
   level j: for each code with d >= j, its j-th group from the inside without its leading 1
   (N bits, N = the value of its group at level j - 1).

Each code keeps its omega length exactly, so bit counts (and QSGD's bound) are unchanged. Values are
limited to [1, 2**32): at most 4 levels, and a decoder rejects any group longer than 31 bits.
"""

from __future__ import annotations

import numpy as np

from atomo_core.wire import WireFormatError

MAX_VALUE = 1 << 32
MAX_DEPTH = 4  # groups of a value < 2**32: 32 bits -> 5 bits -> 3 bits -> 2 bits
_MAX_GROUP_MANTISSA = 31


def bit_length(values: np.ndarray) -> np.ndarray:
    """floor(log2(v)) + 1 for integers 1 <= v < 2**53 (exact: frexp reads the float's exponent)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value's omega groups, outermost first, as rows of a (MAX_DEPTH, count) array, and its depth."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 1 or values.max() >= MAX_VALUE):
        raise ValueError(f"Elias omega codes here take integers in [1, 2**32), got [{values.min()}, {values.max()}]")
    groups = np.zeros((MAX_DEPTH, values.size), dtype=np.int64)
    depth = np.zeros(values.size, dtype=np.int64)
    current = values
    for level in range(MAX_DEPTH):
        more = current > 1
        groups[level] = np.where(more, current, 0)
        depth += more
        current = np.where(more, bit_length(current) - 1, 1)
    return groups, depth


def omega_lengths(values: np.ndarray) -> np.ndarray:
    """Elias omega code length in bits of each value: 1 + the bit lengths of its groups."""
    groups, _ = _groups(values)
    return 1 + np.where(groups > 0, bit_length(np.maximum(groups, 1)), 0).sum(axis=0)


def omega_encode(values: np.ndarray) -> np.ndarray:
    """The depth-major omega bits of `values` as a uint8 array of 0/1 (see the module docstring)."""
    groups, depth = _groups(values)
    unary = np.ones(int(depth.sum()) + depth.size, dtype=np.uint8)
    unary[np.cumsum(depth + 1) - 1] = 0
    parts = [unary]
    for level in range(1, MAX_DEPTH + 1):
        (codes,) = np.nonzero(depth >= level)
        if codes.size == 0:
            break
        group = groups[depth[codes] - level, codes]
        mantissa_bits = bit_length(group) - 1
        parts.append(write_fields(group, mantissa_bits))
    return np.concatenate(parts)


def omega_decode(bits: np.ndarray, start: int, count: int) -> tuple[np.ndarray, int]:
    """Decode `count` depth-major omega codes from the 0/1 array `bits` at `start`; returns (values, end).

    Every read is checked against len(bits), so a malformed stream raises WireFormatError and the work
    is bounded by the buffer size (one pass per level, one vectorized step per bit of a group).
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), start
    if start + count > bits.size:
        raise WireFormatError(f"Elias stream: {count} codes need at least {count} bits, {bits.size - start} left")
    (zeros,) = np.nonzero(bits[start:] == 0)
    if zeros.size < count:
        raise WireFormatError(f"Elias stream: {zeros.size} code terminators found, {count} expected")
    ends = zeros[:count]
    depth = np.diff(ends, prepend=-1) - 1
    if depth.max() > MAX_DEPTH:
        raise WireFormatError(f"Elias stream: a code of {depth.max()} groups exceeds {MAX_DEPTH}")
    position = start + int(ends[-1]) + 1
    values = np.ones(count, dtype=np.int64)
    for level in range(1, int(depth.max()) + 1):
        (codes,) = np.nonzero(depth >= level)
        lengths = values[codes]
        if lengths.max() > _MAX_GROUP_MANTISSA:
            raise WireFormatError(f"Elias stream: a group of {lengths.max() + 1} bits exceeds 32")
        total = int(lengths.sum())
        if position + total > bits.size:
            raise WireFormatError(f"Elias stream: level {level} needs {total} bits, {bits.size - position} left")
        offsets = position + np.cumsum(lengths) - lengths
        values[codes] = (np.int64(1) << lengths) | read_fields(bits, offsets, lengths)
        position += total
    return values, position


def write_fields(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate each value's low `lengths` bits, most significant first, as a uint8 array of 0/1."""
    offsets = np.cumsum(lengths) - lengths
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    active = np.arange(lengths.size)
    for bit in range(int(lengths.max(initial=0))):
        active = active[lengths[active] > bit]
        out[offsets[active] + bit] = (values[active] >> (lengths[active] - 1 - bit)) & 1
    return out


def read_fields(bits: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The inverse of `write_fields` at given bit offsets (callers check offsets + lengths <= len(bits))."""
    values = np.zeros(lengths.size, dtype=np.int64)
    active = np.arange(lengths.size)
    for bit in range(int(lengths.max(initial=0))):
        active = active[lengths[active] > bit]
        values[active] = (values[active] << 1) | bits[offsets[active] + bit]
    return values


def pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers in `width` bits each, most significant first, into bytes."""
    bits = np.empty((values.size, width), dtype=np.uint8)
    for bit in range(width):
        bits[:, bit] = (values >> (width - 1 - bit)) & 1
    return np.packbits(bits.reshape(-1))


def unpack_fixed(data: np.ndarray, count: int, width: int) -> np.ndarray:
    """The inverse of `pack_fixed` (the caller checks that `data` holds count * width bits)."""
    bits = np.unpackbits(data, count=count * width).reshape(count, width)
    values = np.zeros(count, dtype=np.int64)
    for bit in range(width):
        values = (values << 1) | bits[:, bit]
    return values
