"""Ternary quantizers g -> scale * sign(g_i) * zeta_i, zeta_i ~ Bernoulli(|g_i| / scale) (Section 4, eq. for L_q).

TernGrad (scale = ||g||_inf) and l_q quantization (scale = ||g||_q) differ only in the scale, so they share
the sampler and the wire layout here. Sections: scale (float32, 1), meta (int64, 2: coding, nonzeros),
payload (uint8). Codings: PACKED, 2 bits per entry (0 -> 0, 1 -> +1, 3 -> -1), four entries per byte, the
first in the high bits, the last byte zero-padded; SPARSE, one sign bit per nonzero then the Elias omega
codes of the gaps between nonzero indices (`elias`), as QSGD codes them.

PACKED is built and read with torch ops on the tensor's device: encoding a GPU tensor in PACKED copies
nothing to the host (the message's sections stay on the GPU until written to the wire) and `decode_add_`
unpacks on the output's device, all checks in one host sync. SPARSE is coded and decoded on the host.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np
import torch

from atomo_core.codecs import Codec
from atomo_core.quantizers.bitpack import raise_first, uses_fixed
from atomo_core.quantizers.elias import PADDING_BITS, decode_signed, encode_signed, omega_lengths
from atomo_core.wire import DEFAULT_LIMITS, Message, WireFormatError, expect_sections

PACKED, SPARSE = 0, 1
_CODES = (torch.arange(256)[:, None] >> torch.tensor([6, 4, 2, 0])) & 3  # the four 2-bit codes of each byte
_BYTE_VALUES = torch.tensor([0.0, 1.0, 0.0, -1.0])[_CODES]
_BYTE_INVALID = (_CODES == 2).any(dim=1)


def sample_ternary(flat: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """sign(g_i) * zeta_i as int8, zeta_i ~ Bernoulli(|g_i| / scale): one uniform per entry."""
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    probability = flat.abs().mul_(inverse)
    uniform = torch.rand(flat.numel(), generator=generator, device=flat.device)
    return torch.sign(flat).to(torch.int8).mul_(uniform < probability)


def pack_ternary(ternary: torch.Tensor) -> torch.Tensor:
    """2 bits per entry, four entries per byte, first entry in the high bits."""
    codes = ternary.view(torch.uint8) & 3
    codes = torch.nn.functional.pad(codes, (0, -codes.numel() % 4)).view(-1, 4)
    return (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]


def unpack_ternary(payload: torch.Tensor, n: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, str]]]:
    """The float32 entries in {-1, 0, 1} of a 2-bit payload (through a 256-entry table of byte values), on
    the payload's device, and the checks (0-dim bool tensors, see `raise_first`) the caller must raise."""
    if payload.numel() != -(-n // 4):
        raise WireFormatError(f"ternary: {payload.numel()} payload bytes, {n} entries need {-(-n // 4)}")
    payload = payload.long()
    values = _BYTE_VALUES.to(payload.device)[payload].view(-1)
    checks = [
        (_BYTE_INVALID.to(payload.device)[payload].any(), "ternary: invalid 2-bit code 2"),
        (values[n:].any(), "ternary: nonzero padding"),
    ]
    return values[:n], checks


def sparse_ternary_bits(indices: np.ndarray) -> int:
    """Bits of the SPARSE coding: a sign bit and the omega code of the gap for each nonzero (+ padding)."""
    return indices.size + int(omega_lengths(np.diff(indices, prepend=-1)).sum()) + PADDING_BITS


def decode_sparse_ternary(payload: torch.Tensor, n: int, nonzeros: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, negative) of the nonzeros; checks the stream length, padding and index range."""
    negative, gaps = decode_signed(payload.numpy(), nonzeros, nonzeros)
    indices = np.cumsum(gaps) - 1
    if indices.size and indices[-1] >= n:
        raise WireFormatError(f"sparse index {indices[-1]} out of range for {n} entries")
    return indices, negative


def payload_nbytes(codec: Codec, shape: tuple[int, ...], scales: int, payload_bytes: int) -> int:
    """Wire length of a message with `scales` float32 scales, the meta section and a payload of that size."""
    sections = [torch.empty(scales), torch.empty(2, dtype=torch.int64), torch.empty(payload_bytes, dtype=torch.uint8)]
    return len(Message(codec.codec_id, tuple(shape), torch.float32, codec.wire_params(), sections))


class TernaryCodec(Codec):
    """Encodes scale * sign(g) * zeta; subclasses choose the scale and whether SPARSE coding may be used."""

    allow_sparse: bool = False
    coding: str = "fixed"  # "auto", "elias" or "fixed" (`bitpack.CODINGS`); only used with allow_sparse

    @abstractmethod
    def scale(self, flat: torch.Tensor) -> torch.Tensor:
        """The float32 scale of the flattened float32 tensor (a 0-dim tensor)."""

    def prepare(self, flat: torch.Tensor) -> torch.Tensor:
        """The tensor actually quantized (TernGrad clips it here)."""
        return flat

    def expected_nbytes(self, shape):
        """Wire length with the 2-bit payload: exact for TernGrad, an upper bound for l_q."""
        return payload_nbytes(self, shape, 1, -(-math.prod(shape) // 4))

    def encode(self, tensor, generator=None):
        flat = self.prepare(tensor.detach().reshape(-1).to(torch.float32))
        scale = self.scale(flat) if flat.numel() else torch.zeros((), device=flat.device)
        if not bool(torch.isfinite(scale)):
            raise ValueError(f"{self.name}: the scale of this tensor is not finite (non-finite entries or overflow)")
        ternary = sample_ternary(flat, scale, generator)
        if self.allow_sparse and not uses_fixed(self.coding, flat.device):
            (indices,) = torch.nonzero(ternary, as_tuple=True)
            indices_np = indices.cpu().numpy()
            if sparse_ternary_bits(indices_np) < 2 * flat.numel():
                negative = (ternary[indices] < 0).cpu().numpy()
                payload = torch.from_numpy(encode_signed(negative, np.diff(indices_np, prepend=-1)))
                meta = torch.tensor([SPARSE, indices.numel()], dtype=torch.int64)
                return self._message(tensor, [scale.reshape(1).cpu(), meta, payload])
        # PACKED, on the tensor's device: no host sync beyond the finiteness check above.
        nonzeros = torch.count_nonzero(ternary).reshape(1)
        meta = torch.cat([torch.full((1,), PACKED, dtype=torch.int64, device=flat.device), nonzeros])
        return self._message(tensor, [scale.reshape(1), meta, pack_ternary(ternary)])

    def decode_message(self, msg):
        return self.decode_on(msg, msg.sections[0].device if msg.sections else torch.device("cpu"))

    def decode_add_(self, data, out, alpha=1.0, limits=DEFAULT_LIMITS):
        """out += alpha * decode(data), a PACKED payload unpacked on out's device."""
        estimate = self.decode_on(self.parse(data, limits, out), out.device)
        return out.add_(estimate.to(dtype=out.dtype), alpha=alpha)

    def decode_on(self, msg, device: torch.device) -> torch.Tensor:
        """The estimate, on `device`; the checks of a PACKED payload cost one host sync together."""
        n = msg.numel
        payload_bytes = msg.sections[2].numel() if len(msg.sections) == 3 else -1
        expect_sections(msg, [(torch.float32, 1), (torch.int64, 2), (torch.uint8, payload_bytes)], self.name)
        coding, nonzeros = msg.sections[1].tolist()
        if not 0 <= nonzeros <= n:
            raise WireFormatError(f"{self.name}: {nonzeros} nonzeros for {n} entries")
        scale = msg.sections[0].to(device)
        checks = [
            ((~torch.isfinite(scale) | (scale < 0)).any(), f"{self.name}: the scale must be finite and non-negative"),
            ((scale == 0).any() & (nonzeros > 0), f"{self.name}: nonzero entries with a zero scale"),
        ]
        if coding == PACKED:
            ternary, unpacked = unpack_ternary(msg.sections[2].to(device), n)
            checks += unpacked
            checks.append(
                (
                    torch.count_nonzero(ternary) != nonzeros,
                    f"{self.name}: payload has a different number of nonzeros than {nonzeros}",
                )
            )
            raise_first(checks, WireFormatError)
            estimate = ternary.mul_(scale)
        elif coding == SPARSE and self.allow_sparse:
            raise_first(checks, WireFormatError)
            indices, negative = decode_sparse_ternary(msg.sections[2].cpu(), n, nonzeros)
            estimate = torch.zeros(n, device=device)
            signed = torch.from_numpy(np.where(negative, -1.0, 1.0).astype(np.float32)).to(device)
            estimate[torch.from_numpy(indices).to(device)] = signed * scale
        else:
            raise WireFormatError(f"{self.name}: unknown payload coding {coding}")
        return estimate.reshape(msg.shape).to(msg.dtype)
