"""Error feedback: the memory that makes a biased compressor converge, kept by the encoder alone.

EF-SGD (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy, Rebjock, Stich,
Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019, Algorithm 2): each
step compresses the gradient plus what earlier steps left out, and remembers what this step leaves out,

    p_t = g_t + e_t            (1) the corrected gradient
    Delta_t = C(p_t)           (2) the message
    e_{t+1} = p_t - Delta_t    (3) the new residual

so that after T steps  sum_t Delta_t + e_T = sum_t g_t  exactly: nothing is lost, only delayed. The memory is
in gradient units, before the PS's learning rate and momentum, as PowerSGD's Algorithm 2 keeps it (EF-SGD
scales g_t by the step size first; the two agree for a constant learning rate).

The residual is p_t minus the message as the codec's own `decode_message` reads it, never minus an
intermediate of the encoder, so (3) holds to the float rounding of one subtraction against that decode,
whatever the codec computes internally. An aggregator that computes the estimate otherwise can round it
differently: PowerSGD's `decode_add_` forms P Q^T in one addmm_ on the output's device and dtype, which may
differ from the encoder's float32 product by a few ulps per entry (more on a GPU or in a lower precision);
top-k's values are added unchanged either way.

The decoder needs none of this: a message alone decodes to Delta_t. `LayerPolicy` keeps one `Feedback` per
layer (atomo_core/policy.py); the worker keeps its policy for the run (services/worker/worker.py).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

import torch

from atomo_core.codecs import Codec
from atomo_core.wire import Message


@dataclass(frozen=True)
class Feedback:
    """One tensor's memory at one worker.

    residual: e_t, what earlier steps computed but did not send (the tensor's shape; float32, or float64
    for a float64 tensor). warm_start: codec state carried to the next step (PowerSGD's Q), or None.
    """

    residual: torch.Tensor
    warm_start: torch.Tensor | None = None


def check_whole(value: float, low: int, high: float, what: str) -> int:
    """`value` as an int when it is a whole number in [low, high] (3.0 is 3); ValueError naming `what` otherwise."""
    number = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and low <= value <= high and value == int(value)):
        raise ValueError(f"{what} must be a whole number in [{low}, {high}], got {value!r}")
    return int(value)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the corrected gradient and the residual: float64 stays float64, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class FeedbackCodec(Codec):
    """A BIASED compressor C with error feedback: E[decode(C(g))] != g in general.

    `encode_with_feedback` runs one step of (1)-(3) and returns the message and the next state; plain
    `encode` compresses without memory (the first step from a zero residual). Subclasses implement
    `compress`, the map from a corrected gradient to the message's sections.
    """

    biased: ClassVar[bool] = True

    @abstractmethod
    def compress(
        self, corrected: torch.Tensor, warm_start: torch.Tensor | None, generator: torch.Generator | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The sections of C(corrected), and the codec state for the next step (None if it keeps none)."""

    def new_feedback(self, tensor: torch.Tensor) -> Feedback:
        """The memory before the first step: a zero residual shaped like `tensor`, no warm start."""
        return Feedback(torch.zeros(tensor.shape, dtype=working_dtype(tensor.dtype), device=tensor.device))

    def encode(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> Message:
        """C(tensor) without memory: neither a residual added nor a warm start."""
        sections, _ = self.compress(self._corrected(tensor, None), None, generator)
        return self._message(tensor, sections)

    def encode_with_feedback(
        self, tensor: torch.Tensor, feedback: Feedback | None, generator: torch.Generator | None = None
    ) -> tuple[Message, Feedback]:
        """One error-feedback step: the message C(g + e) and the next memory (`feedback` is not modified).

        `feedback` None is the zero memory of `new_feedback`.
        """
        corrected = self._corrected(tensor, feedback)  # (1) p_t = g_t + e_t
        sections, warm_start = self.compress(corrected, None if feedback is None else feedback.warm_start, generator)
        message = self._message(tensor, sections)  # (2) Delta_t = C(p_t)
        sent = self.decode_message(message).to(corrected.dtype)  # what the PS adds
        return message, Feedback(corrected - sent, warm_start)  # (3) e_{t+1} = p_t - Delta_t

    def encode_with_state(self, tensor, state, generator=None):
        """`encode_with_feedback`: the state is the layer's `Feedback` (None: the zero memory)."""
        if state is not None and not isinstance(state, Feedback):
            raise ValueError(f"{self.name}: expected a Feedback as the layer's state, got {type(state).__name__}")
        return self.encode_with_feedback(tensor, state, generator)

    def _corrected(self, tensor: torch.Tensor, feedback: Feedback | None) -> torch.Tensor:
        corrected = tensor.detach().to(working_dtype(tensor.dtype))
        if feedback is not None:
            if feedback.residual.shape != tensor.shape:
                raise ValueError(
                    f"{self.name}: the residual has shape {tuple(feedback.residual.shape)}, the tensor "
                    f"{tuple(tensor.shape)} (a new model needs new memory)"
                )
            corrected = corrected + feedback.residual.to(device=corrected.device, dtype=corrected.dtype)
        if corrected.numel() and not bool(torch.isfinite(corrected).all()):
            raise ValueError(f"{self.name}: the gradient plus residual has non-finite entries")
        return corrected
