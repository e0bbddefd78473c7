"""Test-set evaluation in a background thread, on a copy of the weights, so that training does not wait.

Deferred (`deferred=True`, RunSpec.eval_deferred): the copies are kept and evaluated only after `release()`
(the run's last step), so that no evaluation shares the CPU with the training steps a benchmark times. The
copies held are bounded: once they would exceed MAX_DEFERRED_BYTES (a spec comes from the network: many
evaluation steps of a large model must not exhaust the PS's memory), evaluation starts at once, as if not
deferred, and `released_early` says so.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch.nn import functional as F

from atomo_core.data import Split
from atomo_core.models import build_model

EVAL_BATCH = 512


MAX_DEFERRED_BYTES = 2 << 30  # weight copies a deferred evaluator may hold before it starts evaluating


class EvaluationError(RuntimeError):
    """An evaluation raised in the evaluator's thread; its message names the step and the cause."""


class Evaluator:
    """`submit(step, state_dict)` queues an evaluation; `results()` returns the finished ones."""

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        in_channels: int,
        test: Split,
        device: torch.device,
        deferred: bool = False,
    ):
        self.model = build_model(model_name, num_classes, in_channels).to(device)
        self.test = test.to(device)
        self.device = device
        self.released = threading.Event()
        self.released_early = False
        self.held_bytes = 0
        if not deferred:
            self.released.set()
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="evaluate", daemon=True)
        self.thread.start()

    def submit(self, step: int, state: dict[str, torch.Tensor]) -> None:
        """Evaluate the weights `state` (a copy, owned by the evaluator from now on) of step `step`."""
        if not self.released.is_set():
            self.held_bytes += sum(t.numel() * t.element_size() for t in state.values())
            if self.held_bytes > MAX_DEFERRED_BYTES:
                self.released_early = True
                self.released.set()
        self.todo.put((step, state))

    def results(self) -> list[tuple[int, float, float]]:
        """(step, test accuracy, test loss) of the evaluations finished since the last call; an evaluation
        that raised re-raises its exception here, in the caller's thread (the run fails with it)."""
        out = []
        while True:
            try:
                result = self.done.get_nowait()
            except queue.Empty:
                return out
            if isinstance(result, EvaluationError):
                raise result
            out.append(result)

    def release(self) -> None:
        """Start evaluating (deferred: the copies submitted so far and every later one; otherwise a no-op)."""
        self.released.set()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the evaluations queued so far, waiting at most `timeout_s` for them (0: return at once;
        the thread finishes the evaluation it is running, then exits)."""
        self.released.set()
        self.todo.put(None)
        if timeout_s > 0:
            self.thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        self.released.wait()
        while (job := self.todo.get()) is not None:
            step, state = job
            try:
                self.done.put((step, *self.evaluate(state)))
            except Exception as exc:  # e.g. out of memory: reported by results(), the thread goes on
                error = EvaluationError(f"evaluation of step {step} failed: {type(exc).__name__}: {exc}")
                self.done.put(error.with_traceback(exc.__traceback__))

    @torch.no_grad()
    def evaluate(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Accuracy and mean cross-entropy loss of the weights `state` on the test split."""
        self.model.load_state_dict(state)
        self.model.eval()
        correct, loss = 0, 0.0
        for start in range(0, len(self.test), EVAL_BATCH):
            x, y = self.test.x[start : start + EVAL_BATCH], self.test.y[start : start + EVAL_BATCH]
            logits = self.model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return correct / len(self.test), loss / len(self.test)
