"""Top-k sparsification (BIASED): keep the k largest-magnitude entries of the corrected gradient.

With error feedback (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019, EF-SGD) the
entries left out are carried to later steps in the worker's residual (atomo_core/biased/feedback.py). The
estimate is biased: top-k of g_t is not g_t in expectation (entries below the k-th magnitude are always
dropped), whereas ATOMO's entrywise codec samples every entry with p_i > 0 and rescales by 1 / p_i.

Sections, for k = min(budget, numel) entries: their flat indices (int32, strictly increasing) and their
values (float32). Bytes: the header plus 8 k, each section padded to 8 bytes. The header carries (budget,).
"""

from __future__ import annotations

import math

import torch

from atomo_core.biased.feedback import FeedbackCodec, check_whole
from atomo_core.codecs import register_codec
from atomo_core.decompositions.base import check_finite, check_increasing_indices, section_counts
from atomo_core.wire import CODEC_IDS, DEFAULT_LIMITS, Message, WireFormatError, WireLimits

MAX_INDEX = 2**31 - 1  # int32 indices


@register_codec
class TopKCodec(FeedbackCodec):
    """`budget` = k entries kept per tensor (BIASED; error feedback through `encode_with_feedback`)."""

    name = "topk"
    codec_id = CODEC_IDS["topk"]

    def __init__(self, budget: int = 300):
        self.budget = check_whole(budget, 1, math.inf, "topk: budget (entries kept per tensor)")

    def entries(self, numel: int) -> int:
        return min(self.budget, numel)

    def compress(self, corrected, warm_start, generator):
        flat = corrected.reshape(-1)
        if flat.numel() > MAX_INDEX + 1:
            raise ValueError(f"topk: {flat.numel()} entries do not fit int32 indices")
        index = torch.topk(flat.abs(), self.entries(flat.numel()), sorted=False).indices.sort().values
        return [index.to(torch.int32), flat[index].to(torch.float32)], None

    def wire_params(self):
        return (float(self.budget),)

    @classmethod
    def from_wire_params(cls, params):
        if len(params) != 1:
            raise WireFormatError(f"topk: expected one parameter (budget), got {len(params)}")
        try:
            return cls(params[0])
        except ValueError as exc:
            raise WireFormatError(str(exc)) from exc

    def _entries(self, msg: Message) -> tuple[torch.Tensor, torch.Tensor]:
        """The message's validated flat indices (int64, strictly increasing, in range) and values."""
        n = msg.numel
        k = self.entries(n)
        counts = section_counts(msg.sections, [torch.int32, torch.float32], self.name)
        if counts != [k, k]:
            raise WireFormatError(
                f"topk: budget {self.budget} of {n} entries needs {k} indices and values, got {counts}"
            )
        index, values = msg.sections
        check_finite(values, "topk: values")
        index = index.long()
        check_increasing_indices(index, n, "topk: indices")
        return index, values

    def decode_message(self, msg):
        index, values = self._entries(msg)
        estimate = torch.zeros(msg.numel, dtype=torch.float32, device=values.device)
        estimate[index] = values
        return estimate.reshape(msg.shape).to(msg.dtype)

    def decode_add_(self, data, out: torch.Tensor, alpha: float = 1.0, limits: WireLimits = DEFAULT_LIMITS):
        """out += alpha * decode(data) without the dense estimate: the k values are added on out's device
        (index_add_; the indices are strictly increasing, so each entry receives one addition)."""
        msg = self.parse(data, limits, out)
        if not out.is_contiguous():
            return super().decode_add_(msg, out, alpha, limits)
        index, values = self._entries(msg)
        values = values.to(msg.dtype).to(device=out.device, dtype=out.dtype)
        out.view(-1).index_add_(0, index.to(out.device), values, alpha=alpha)
        return out

    def expected_nbytes(self, shape):
        k = self.entries(math.prod(shape))
        sections = [torch.empty(k, dtype=torch.int32, device="meta"), torch.empty(k, device="meta")]
        return len(Message(self.codec_id, tuple(shape), torch.float32, self.wire_params(), sections))
