"""A model replica and the one synchronous SGD step that the PS and every worker run (Section 2).

Mini-batch SGD on a parameter server: the PS averages the k (sparsified) gradients g_1..g_k of a step and
applies w <- w - lr * optimizer(mean_i g_i). In the `atoms` downlink the PS forwards the k encoded gradients
it aggregated, and every worker runs this same code on them in the same order (decode, sum, divide by k,
optimizer step), so replicas on the same device type stay bitwise equal to the PS's model.

Frame layout of a gradient: one encoded message per parameter, in `model.parameters()` order, then one dense
message per floating-point buffer (BatchNorm running mean and variance), which the PS averages.
"""

from __future__ import annotations

import hashlib
import math

import torch

from atomo_core import Message, WireFormatError, codec_for, decode_add_, dense_nbytes, make_codec
from atomo_core.models import build_model
from atomo_core.wire import decode_message
from services.common.spec import MODELS, RunSpec

DENSE = make_codec("dense")
FRAME_SLACK = 4096  # bytes beyond a tensor's fp32 payload: the wire header (shape, parameters, sections)


class GradientError(ValueError):
    """An encoded gradient or state that fails validation; `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def learning_rate(spec: RunSpec, step: int, total_steps: int) -> float:
    """The step size of step `step`: linear warm-up, then constant, step (x0.1 at milestones) or cosine decay."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.lr_schedule == "step":
        return spec.lr * 0.1 ** sum(step >= m for m in spec.step_milestones)
    if spec.lr_schedule == "cosine":
        span = max(1, total_steps - spec.warmup_steps)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - spec.warmup_steps) / span)))
    return spec.lr


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of `tensors` is finite: one fused norm pass, confirmed by exact float64 sums when
    the norms overflow (fp32 entries near 1e19 square beyond the float range without being infinite)."""
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack(torch._foreach_norm([t.detach() for t in tensors]))).all()):
        return True
    return bool(torch.isfinite(torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors])).all())


def max_frame_bytes(model_names=MODELS, num_classes: int = 100, in_channels: int = 3) -> int:
    """The largest payload frame of these models: one tensor dense in fp32, plus room for the wire header."""
    largest = 0
    with torch.device("meta"):
        for name in model_names:
            model = build_model(name, num_classes, in_channels)
            largest = max(largest, max(t.numel() for t in [*model.parameters(), *model.buffers()]))
    return 4 * largest + FRAME_SLACK


def resolve_device(device: str) -> torch.device:
    """`auto`: CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def run_device(requested: str, process_device: torch.device) -> torch.device:
    """A run's device: the spec's `device`, or this process's own (its --device flag) when the spec says auto."""
    return process_device if requested == "auto" else resolve_device(requested)


class Replica:
    """The model, its SGD optimizer and a gradient accumulator; identical code on the PS and the workers."""

    def __init__(self, spec: RunSpec, num_classes: int, in_channels: int, device: torch.device):
        self.spec = spec
        self.device = device
        self.model = build_model(spec.model, num_classes, in_channels).to(device)
        self.params = list(self.model.parameters())
        self.buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        self.optimizer = torch.optim.SGD(
            self.params,
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov and spec.momentum > 0,
            weight_decay=spec.weight_decay,
        )
        self.grad_sum = [torch.zeros_like(p) for p in self.params]
        self.buffer_sum = [torch.zeros_like(b) for b in self.buffers]
        self.summed = 0

    @property
    def num_frames(self) -> int:
        return len(self.params) + len(self.buffers)

    @property
    def dense_bytes(self) -> int:
        """Bytes of one gradient sent dense in fp32 (what a compressed one is compared with)."""
        return sum(dense_nbytes(tuple(t.shape)) for t in self.params + self.buffers)

    def parse_gradient(self, frames) -> list[Message]:
        """Validate one worker's gradient frames before anything is added: the frame count, every wire
        header, the codec and its parameters, each tensor's shape, and finite floating-point payloads."""
        if len(frames) != self.num_frames:
            raise GradientError("bad_frames", f"{len(frames)} frames, expected {self.num_frames}")
        messages = []
        for i, (frame, ref) in enumerate(zip(frames, self.params + self.buffers, strict=True)):
            try:
                msg = decode_message(frame)
                codec = codec_for(msg)
            except WireFormatError as exc:
                raise GradientError("bad_payload", f"frame {i}: {exc}") from exc
            if i >= len(self.params) and codec.name != "dense":
                raise GradientError("bad_payload", f"frame {i}: buffers are sent dense, got {codec.name}")
            if tuple(msg.shape) != tuple(ref.shape):
                raise GradientError("bad_shape", f"frame {i}: shape {tuple(msg.shape)}, expected {tuple(ref.shape)}")
            if not all(torch.isfinite(s.sum(dtype=torch.float64)) for s in msg.sections if s.is_floating_point()):
                raise GradientError("non_finite", f"frame {i}: non-finite values")
            messages.append(msg)
        return messages

    def begin_step(self) -> None:
        for t in self.grad_sum + self.buffer_sum:
            t.zero_()
        self.summed = 0

    def accumulate(self, messages: list[Message]) -> None:
        """Decode one parsed gradient and its buffers straight into the step's sums (no temporaries).

        A payload that the codec rejects half-way raises GradientError and leaves the sums partial:
        rebuild them from the gradients accepted before (`rebuild`)."""
        try:
            decode_add_(messages, self.grad_sum + self.buffer_sum)
        except WireFormatError as exc:
            raise GradientError("bad_payload", str(exc)) from exc
        self.summed += 1

    def sums_finite(self) -> bool:
        """One pass over the sums: a finite payload can still decode to inf (huge coefficients)."""
        return all_finite(self.grad_sum + self.buffer_sum)

    def model_finite(self) -> bool:
        """Whether the parameters and buffers are finite (after an update: a diverging run overflows them)."""
        return all_finite(self.params + self.buffers)

    def rebuild(self, gradients: list[list[Message]]) -> list[int]:
        """Sum `gradients` again in order, checking the sums after each; return the indices of those that fail
        to decode or make the sums non-finite (left out: the sums are redone from the good ones)."""
        good: list[list[Message]] = []
        bad = []
        self.begin_step()
        for i, messages in enumerate(gradients):
            try:
                self.accumulate(messages)
                ok = self.sums_finite()
            except GradientError:
                ok = False
            if ok:
                good.append(messages)
                continue
            bad.append(i)
            self.begin_step()
            for kept in good:
                self.accumulate(kept)
        return bad

    def finish_step(self, lr: float) -> None:
        """w <- SGD(w, mean of the summed gradients) with step size `lr` (momentum, Nesterov, weight decay);
        BatchNorm running statistics <- the mean of the summed workers' buffers."""
        for p, total in zip(self.params, self.grad_sum, strict=True):
            p.grad = total.div_(self.summed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for b, total in zip(self.buffers, self.buffer_sum, strict=True):
                b.copy_(total.div_(self.summed))

    def sgd_step(self, gradients, lr: float) -> None:
        """Decode the k gradients in the PS's order, average them and step: the PS accumulates the same way
        as the gradients arrive, so both run begin_step, accumulate x k, finish_step."""
        self.begin_step()
        for frames in gradients:
            self.accumulate(self.parse_gradient(frames))
        if not self.sums_finite():
            raise GradientError("non_finite", "the aggregated gradient is not finite")
        self.finish_step(lr)

    def digest(self) -> str:
        """A hash of the parameters' and buffers' bytes: equal digests mean bitwise-equal replicas."""
        h = hashlib.blake2b(digest_size=16)
        for t in self.params + self.buffers:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def momentum_buffers(self) -> list[torch.Tensor] | None:
        buffers = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]
        return None if any(b is None for b in buffers) else buffers

    def state_messages(self, with_momentum: bool) -> tuple[list, bool]:
        """Dense messages of copies of the parameters, buffers and (optionally) momentum: a replica's state."""
        tensors = self.params + self.buffers
        momentum = self.momentum_buffers() if with_momentum else None
        if momentum is not None:
            tensors = tensors + momentum
        return [DENSE.encode(t.detach().cpu().clone()) for t in tensors], momentum is not None

    def load_state_messages(self, frames, with_momentum: bool) -> None:
        """Replace the state by frames from `state_messages`, validated before anything is overwritten."""
        targets = self.params + self.buffers + (self.params if with_momentum else [])
        if len(frames) != len(targets):
            raise GradientError("bad_frames", f"{len(frames)} state frames, expected {len(targets)}")
        values = []
        for i, (frame, ref) in enumerate(zip(frames, targets, strict=True)):
            try:
                value = DENSE.decode(frame)
            except WireFormatError as exc:
                raise GradientError("bad_payload", f"state frame {i}: {exc}") from exc
            if value.shape != ref.shape or not torch.isfinite(value.sum()):
                raise GradientError("bad_state", f"state frame {i}: wrong shape or non-finite values")
            values.append(value)
        n = len(self.params) + len(self.buffers)
        with torch.no_grad():
            for t, value in zip(self.params + self.buffers, values[:n], strict=True):
                t.copy_(value)
        self.optimizer.state.clear()
        if with_momentum:
            for p, value in zip(self.params, values[n:], strict=True):
                self.optimizer.state[p]["momentum_buffer"] = value.to(p.device).clone()
