"""PowerSGD's compressor (BIASED): a rank-r approximation P Q^T of the corrected gradient, from one power step.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization",
NeurIPS 2019, Algorithm 1, with the error feedback of its Algorithm 2 (atomo_core/biased/feedback.py). Per
tensor, M is the corrected gradient viewed as a matrix [out, in*k*k] (the "rows" reshape of the svd codec;
1-D tensors are one row), n x m, and r = min(rank, n, m):

    Q <- this worker's Q of the previous step for this layer (warm start);
         at the first step, a standard normal m x r matrix from the encoder's generator
    P <- M Q                       (Algorithm 1, line 3)
    P <- orthogonalize(P)          (line 5; reduced QR, so P's columns are orthonormal even when M Q is
                                    rank-deficient)
    Q <- M^T P                     (line 6)
    message: P (n x r) and Q (m x r); decode: P Q^T = P P^T M, M projected onto P's columns
    residual: M - P Q^T; the next step starts from this Q

The estimate is biased: P Q^T is a projection of M, not M in expectation. Unlike PowerSGD in DDP (torch's
powerSGD_hook), there is no all-reduce of P between the two halves: in our PS runtime each worker sends its
own P_i and Q_i and the PS averages the products P_i Q_i^T, so the average need not have rank r, and each
worker's warm start is its own Q.

Sections: P (float32, n r) and Q (float32, m r), both row-major. Bytes: the header plus 4 r (n + m), each
section padded to 8 bytes. The header carries (rank,).
"""

from __future__ import annotations

import torch

from atomo_core.biased.feedback import FeedbackCodec, check_whole
from atomo_core.codecs import register_codec
from atomo_core.decompositions.base import check_finite, meta, section_counts
from atomo_core.decompositions.spectral import matrix_shape
from atomo_core.wire import CODEC_IDS, DEFAULT_LIMITS, Message, WireFormatError, WireLimits

MAX_RANK = 1024


@register_codec
class PowerSGDCodec(FeedbackCodec):
    """`rank` r of P Q^T (BIASED; error feedback and warm start through `encode_with_feedback`)."""

    name = "powersgd"
    codec_id = CODEC_IDS["powersgd"]

    def __init__(self, rank: int = 4):
        self.rank = check_whole(rank, 1, MAX_RANK, "powersgd: rank")

    def factor_shapes(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(n, m, r): the matrix view of a tensor of `shape` and the rank actually sent."""
        rows, columns = matrix_shape(tuple(shape), "rows")
        return rows, columns, min(self.rank, rows, columns)

    def compress(self, corrected, warm_start, generator):
        rows, columns, r = self.factor_shapes(tuple(corrected.shape))
        m = corrected.reshape(rows, columns)
        if warm_start is None:
            device = generator.device if generator is not None else m.device
            q = torch.randn(columns, r, generator=generator, device=device, dtype=m.dtype).to(m.device)
        elif warm_start.shape == (columns, r):
            q = warm_start.to(device=m.device, dtype=m.dtype)
        else:
            raise ValueError(
                f"powersgd: warm start of shape {tuple(warm_start.shape)}, this layer needs {(columns, r)}"
            )
        p = m @ q  # line 3: P = M Q
        p = torch.linalg.qr(p, mode="reduced").Q  # line 5: orthonormal columns
        q = m.T @ p  # line 6: Q = M^T P
        return [p.to(torch.float32).reshape(-1), q.to(torch.float32).reshape(-1)], q

    def wire_params(self):
        return (float(self.rank),)

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 1:
            raise WireFormatError(f"powersgd: expected one parameter (rank), got {len(params)}")
        try:
            return cls(params[0])
        except ValueError as exc:
            raise WireFormatError(str(exc)) from exc

    def _factors(self, msg: Message) -> tuple[torch.Tensor, torch.Tensor]:
        """The message's validated factors, P (n x r) and Q (m x r)."""
        rows, columns, r = self.factor_shapes(msg.shape)
        counts = section_counts(msg.sections, [torch.float32, torch.float32], self.name)
        if counts != [rows * r, columns * r]:
            raise WireFormatError(
                f"powersgd: rank {r} of a {rows} x {columns} matrix needs {rows * r} and {columns * r} factor "
                f"entries, got {counts[0]} and {counts[1]}"
            )
        p, q = msg.sections
        check_finite(p, "powersgd: P")
        check_finite(q, "powersgd: Q")
        return p.reshape(rows, r), q.reshape(columns, r)

    def decode_message(self, msg):
        p, q = self._factors(msg)
        return (p @ q.T).reshape(msg.shape).to(msg.dtype)

    def decode_add_(self, data, out: torch.Tensor, alpha: float = 1.0, limits: WireLimits = DEFAULT_LIMITS):
        """out += alpha * P Q^T without the dense estimate: the factors are copied to out's device and added
        there in one addmm_ (in out's dtype; it may round differently from decode's float32 product)."""
        msg = self.parse(data, limits, out)
        if not out.is_contiguous():
            return super().decode_add_(msg, out, alpha, limits)
        p, q = self._factors(msg)
        device, dtype = out.device, out.dtype
        out.view(p.shape[0], q.shape[0]).addmm_(
            p.to(device=device, dtype=dtype), q.to(device=device, dtype=dtype).T, alpha=alpha
        )
        return out

    def expected_nbytes(self, shape):
        rows, columns, r = self.factor_shapes(tuple(shape))
        sections = [meta(rows * r, torch.float32), meta(columns * r, torch.float32)]
        return len(Message(self.codec_id, tuple(shape), torch.float32, self.wire_params(), sections))
