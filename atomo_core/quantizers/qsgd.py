"""QSGD (Alistarh et al., NeurIPS 2017) with s = 2**bits - 1 levels, bucketing and Elias coding.

Per bucket v (Sec. 3.1, eq. for Q_s): Q_s(v)_i = ||v||_2 sign(v_i) l_i / s, with r_i = s |v_i| / ||v||_2 and
the unbiased stochastic rounding l_i = floor(r_i) + Bernoulli(r_i - floor(r_i)), so E[l_i] = r_i and
E[l_i^2] = floor(r_i)^2 + (2 floor(r_i) + 1) frac(r_i).

Coding (chosen per message, flagged in the meta section):

- ELIAS, QSGD's sparse code (Sec. 3.1, "Efficient coding of gradients"): 32 bits per bucket norm, then for
  each nonzero level, the Elias omega code of the gap to the previous nonzero index (the first one's
  index + 1), a sign bit and the Elias omega code of l_i. The gaps run across bucket boundaries (the
  bucket of an index is index // bucket_size), so no per-bucket counts are sent. The omega codes are
  stored depth-major (`elias`): the same number of bits as QSGD's concatenated codes (plus at most 21
  bits of byte padding), but decodable with a few vectorized passes. QSGD's Theorem 3.2 bounds the
  expected bits of one bucket of n entries by
  (3 + (3/2 + o(1)) log2(2(s^2 + n) / (s(s + sqrt n)))) s(s + sqrt n) + 32 (`elias_bits_bound`).
- FIXED: b + 1 bits per entry (the sign bit, then the level l_i in b bits, s = 2**b - 1 so l_i always fits;
  the sign bit is 0 where l_i = 0), fields back to back, most significant bit first, the last byte
  zero-padded (`bitpack`).

The codec's `coding` option chooses between them on the encoding side (the decoder reads the meta section):
"elias" codes on the host, Elias whenever it is smaller than the fixed width (at 4 bits and 512-entry buckets
about 3.5x smaller, see bench/codecs.py), else FIXED; "fixed" always packs FIXED with torch ops on the
tensor's device, so that a GPU tensor is never copied to the host (its message's sections stay on the GPU
until they are written to the wire); "auto" (the default) is "fixed" for tensors off the CPU, else "elias".
Both codings carry the same levels, so for one generator they decode to bitwise the same estimate. The
decoder unpacks FIXED payloads on the output's device (`decode_add_`) or the message's (`decode`); Elias
streams are decoded on the host and only their nonzeros moved.

Sections: norms (float32, one per bucket), meta (int64, 2: coding, nonzeros), payload (uint8).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from atomo_core.codecs import Codec, register_codec
from atomo_core.quantizers.bitpack import check_coding, pack_bits, raise_first, unpack_bits, uses_fixed
from atomo_core.quantizers.elias import PADDING_BITS, decode_signed, encode_signed, omega_lengths
from atomo_core.quantizers.ternary import payload_nbytes
from atomo_core.wire import CODEC_IDS, DEFAULT_LIMITS, WireFormatError, expect_sections

FIXED, ELIAS = 0, 1
MAX_BITS = 16
DEFAULT_BUCKET = 512  # QSGD's experiments bucket by 512; one bucket per tensor diverges at 2 bits (LeNet-5)


def elias_bits_bound(n: int, s: int) -> float:
    """QSGD Theorem 3.2 without its o(1) term: expected bits of the Elias code of one bucket of n entries."""
    nonzeros = s * (s + math.sqrt(n))  # QSGD Lemma 3.1: E||Q_s(v)||_0 <= s(s + sqrt n)
    return (3 + 1.5 * math.log2(2 * (s * s + n) / nonzeros)) * nonzeros + 32


@register_codec
class QSGDCodec(Codec):
    """`bits` b in [1, 16] (s = 2**b - 1 levels); `bucket_size` d entries per norm (default 512, QSGD's; 0 or
    None: one bucket per tensor); `coding` "auto" (default), "elias" or "fixed" (see above). The coding is not
    a header parameter: each message's meta section says how its payload is coded."""

    name = "qsgd"
    codec_id = CODEC_IDS["qsgd"]

    def __init__(self, bits: int = 4, bucket_size: int | None = DEFAULT_BUCKET, coding: str = "auto"):
        if not (1 <= bits <= MAX_BITS and bits == int(bits)):
            raise ValueError(f"qsgd: bits must be an integer in [1, {MAX_BITS}], got {bits}")
        bucket_size = bucket_size or 0
        if not (0 <= bucket_size < 2**32 and bucket_size == int(bucket_size)):
            raise ValueError(f"qsgd: bucket_size must be a non-negative integer, got {bucket_size}")
        self.bits = int(bits)
        self.bucket_size = int(bucket_size)
        self.levels = 2**self.bits - 1
        self.coding = check_coding(self.name, coding)

    def buckets(self, n: int) -> tuple[int, int]:
        """(bucket size, number of buckets) for a tensor of n entries."""
        size = self.bucket_size or max(n, 1)
        return size, -(-n // size)

    def quantize(self, flat: torch.Tensor, generator: torch.Generator | None):
        """Bucket norms (float32) and the levels l_i (float32, 0..s) of the flattened float32 tensor."""
        n = flat.numel()
        size, count = self.buckets(n)
        full = n - n % size
        magnitudes = flat.abs()
        buckets = [magnitudes[:full].view(-1, size)] + ([magnitudes[full:].view(1, -1)] if full < n else [])
        norms = torch.cat([torch.linalg.vector_norm(b, dim=1) for b in buckets])
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("qsgd: the tensor has non-finite entries or its bucket norms overflow float32")
        scale = torch.where(norms > 0, self.levels / norms, torch.zeros_like(norms))
        buckets[0].mul_(scale[: buckets[0].shape[0], None])
        if full < n:
            buckets[1].mul_(scale[-1])
        ratio = magnitudes.clamp_(max=self.levels)  # r_i = s |v_i| / ||v||
        levels = ratio.floor()
        fraction = ratio.sub_(levels)
        uniform = torch.rand(n, generator=generator, device=flat.device)
        return norms, levels.add_(uniform.lt_(fraction))  # round up with probability frac(r_i): unbiased

    def encode(self, tensor, generator=None):
        flat = tensor.detach().reshape(-1).to(torch.float32)
        norms, levels = self.quantize(flat, generator)
        if uses_fixed(self.coding, flat.device):  # on the tensor's device, no host sync
            nonzeros = torch.count_nonzero(levels).reshape(1)
            meta = torch.cat([torch.full((1,), FIXED, dtype=torch.int64, device=flat.device), nonzeros])
            return self._message(tensor, [norms, meta, self.pack_fixed(flat, levels)])
        (indices,) = torch.nonzero(levels, as_tuple=True)
        negative = (flat[indices] < 0).cpu().numpy()
        nonzero_levels = levels[indices].to(torch.int64).cpu().numpy()
        indices = indices.cpu().numpy()
        fixed_bits = flat.numel() * (self.bits + 1)
        payload = None
        if 3 * indices.size < fixed_bits:  # every nonzero costs at least 3 bits in the Elias code
            codes = np.stack([np.diff(indices, prepend=-1), nonzero_levels], axis=1).reshape(-1)
            if indices.size + int(omega_lengths(codes).sum()) + PADDING_BITS < fixed_bits:
                payload = torch.from_numpy(encode_signed(negative, codes))
        coding = FIXED if payload is None else ELIAS
        if payload is None:
            payload = self.pack_fixed(flat, levels).cpu()
        meta = torch.tensor([coding, indices.size], dtype=torch.int64)
        return self._message(tensor, [norms.cpu(), meta, payload])

    def pack_fixed(self, flat: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The FIXED payload: sign bit (set for l_i > 0 and v_i < 0) then l_i in b bits, on levels' device."""
        words = levels.to(torch.int32) | (((flat < 0) & (levels > 0)).to(torch.int32) << self.bits)
        return pack_bits(words, self.bits + 1)

    def expected_nbytes(self, shape):
        """Wire length with the smaller of the fixed-width payload and Theorem 3.2's bound per bucket.

        With coding "fixed", the fixed-width length (exact). With "auto" the device is not known here: this is
        the host's (Elias) estimate, which a GPU tensor's fixed-width message exceeds at low bit counts.
        """
        n = math.prod(shape)
        size, count = self.buckets(n)
        payload_bits = n * (self.bits + 1)
        if n and self.coding != "fixed":
            last = n - (count - 1) * size
            theorem = (count - 1) * elias_bits_bound(size, self.levels) + elias_bits_bound(last, self.levels)
            payload_bits = min(payload_bits, math.ceil(theorem) - 32 * count + PADDING_BITS)
        return payload_nbytes(self, shape, count, -(-payload_bits // 8))

    def wire_params(self):
        return (float(self.bits), float(self.bucket_size))

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 2:
            raise WireFormatError(f"qsgd: expected 2 parameters (bits, bucket_size), got {len(params)}")
        try:
            return cls(bits=params[0], bucket_size=params[1])
        except ValueError as exc:
            raise WireFormatError(str(exc)) from exc

    def decode_message(self, msg):
        return self.decode_on(msg, msg.sections[0].device if msg.sections else torch.device("cpu"))

    def decode_add_(self, data, out, alpha=1.0, limits=DEFAULT_LIMITS):
        """out += alpha * decode(data), a FIXED payload unpacked on out's device."""
        estimate = self.decode_on(self.parse(data, limits, out), out.device)
        return out.add_(estimate.to(dtype=out.dtype), alpha=alpha)

    def decode_on(self, msg, device: torch.device) -> torch.Tensor:
        """The estimate, on `device`; every check of the payload costs one host sync together."""
        n = msg.numel
        size, count = self.buckets(n)
        payload_bytes = msg.sections[2].numel() if len(msg.sections) == 3 else -1
        expect_sections(msg, [(torch.float32, count), (torch.int64, 2), (torch.uint8, payload_bytes)], self.name)
        coding, nonzeros = msg.sections[1].tolist()
        if not 0 <= nonzeros <= n:
            raise WireFormatError(f"qsgd: {nonzeros} nonzeros for {n} entries")
        norms = msg.sections[0].to(device)
        checks = [
            ((~(torch.isfinite(norms) & (norms >= 0))).any(), "qsgd: bucket norms must be finite and non-negative")
        ]
        if coding == FIXED:
            if payload_bytes != -(-n * (self.bits + 1) // 8):
                raise WireFormatError(f"qsgd: {payload_bytes} payload bytes for {n} entries of {self.bits + 1} bits")
            words, padding = unpack_bits(msg.sections[2].to(device), n, self.bits + 1)
            levels, negative = words & self.levels, words >> self.bits
            checks += [
                (padding, "qsgd: nonzero padding bits after the last entry"),
                (((negative > 0) & (levels == 0)).any(), "qsgd: sign bit set on a zero level"),
                (torch.count_nonzero(levels) != nonzeros, f"qsgd: payload's nonzero levels differ from {nonzeros}"),
            ]
            signed = torch.where(negative > 0, -levels, levels).to(torch.float32)
        elif coding == ELIAS:
            negative, codes = decode_signed(msg.sections[2].numpy(), nonzeros, 2 * nonzeros)
            indices = np.cumsum(codes[0::2]) - 1
            levels = codes[1::2]
            if indices.size and indices[-1] >= n:
                raise WireFormatError(f"qsgd: index {indices[-1]} out of range for {n} entries")
            if levels.size and levels.max() > self.levels:
                raise WireFormatError(f"qsgd: level {levels.max()} exceeds s = {self.levels}")
            signed = torch.zeros(n, device=device)
            values = torch.from_numpy(np.where(negative, -levels, levels).astype(np.float32))
            signed[torch.from_numpy(indices).to(device)] = values.to(device)
        else:
            raise WireFormatError(f"qsgd: unknown payload coding {coding}")
        entry_norms = norms[:, None].expand(count, size).reshape(-1)[:n]
        checks.append((((entry_norms == 0) & (signed != 0)).any(), "qsgd: nonzero level in a bucket of norm 0"))
        raise_first(checks, WireFormatError)
        # Q_s(v)_i = ||v|| sign(v_i) l_i / s. s as a tensor on the device: CUDA divides by a host scalar as a
        # multiplication by its reciprocal, which would round differently from the CPU's division.
        estimate = entry_norms * signed / torch.full((), float(self.levels), device=device)
        return estimate.reshape(msg.shape).to(msg.dtype)
