"""One training run on the PS: synchronous data-parallel SGD with encoded gradients (Section 2).

Each step t: the PS publishes the state of step t; every participating worker sends the encoded gradient
of its batch; the PS decodes and sums the first k gradients as they arrive (late ones are dropped),
takes the optimizer step with their mean (`Replica.finish_step`, the same code the workers run in the
`atoms` downlink) and publishes step t+1: the k messages it aggregated, forwarded unchanged (`atoms`), or the
dense model (`model`). Workers whose replica is not at step t get the full state instead (a RUN message).

k is `num_aggregate` or, by default, every live participant of the step. A worker that joins mid-run gets
the state and computes from the next step on; a lost worker's shard waits for the next worker that joins.
A participant that has not sent its gradient by the step's deadline (`step_deadline_s`) is timed out: it
leaves this run as a lost worker does, although it still heart-beats.

A run can fail; the PS cannot. Every entry point the PS loop calls (`tick`, `on_gradient`,
`on_worker_ready`, `on_worker_lost`, `cancel`) is guarded: an exception fails this run with its type and
message in `error`. A plugin codec (another package's code) decodes under a time limit (the PS's
`plugin_decode_timeout_s`): a decode that runs past it, or that rejects or chokes on its own messages, fails
the run with an `error` naming the plugin and why, and the PS's loop goes on. A non-finite value (a worker's
loss, the aggregated loss or any other figure of a step's record, the model after an update, a test loss or
accuracy) fails it with "training diverged at step N: ...";
the checkpoint on disk is then the last one written, always of finite weights.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from atomo_core.codecs import load_plugin
from atomo_core.data import BatchStream, load_dataset
from services.common.protocol import Header, MsgType
from services.common.replica import GradientError, Replica, learning_rate, run_device
from services.common.spec import CODECS, RunSpec
from services.ps.evaluate import Evaluator
from services.ps.rundir import RunDirectory

log = logging.getLogger("atomo.ps")

START_GRACE_S = 10.0  # after this long, a run starts with min_workers instead of waiting for all workers
RECORDS_IN_MEMORY = 10_000
MEAN_TIMINGS = ("encode_s", "compute_s", "communication_s")
# A step's deadline: this many times the median of the recent step times, and never below the PS's
# --step-timeout-s (default STEP_TIMEOUT_S, which covers a worker's start-up: data set, model, first batch).
STEP_TIMEOUT_S = 60.0
STEP_TIMEOUT_FACTOR = 20
RECENT_STEPS = 50
MAX_ERROR_CHARS = 1000


def json_safe(record: dict) -> dict:
    """`record` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def non_finite(record: dict) -> list[str]:
    """The keys of `record` whose value is a non-finite float."""
    return [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]


def _describe(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


class DecodeTimeout(BaseException):
    """A decode ran past its time limit (a BaseException: a plugin's `except Exception` does not swallow it)."""


class PluginFailure(Exception):
    """A plugin codec hung, was too slow, or could not decode its own messages: the run fails with this."""


MAX_DECODE_TIMEOUT_S = 86_400.0  # a plugin decode's time limit at most: a day (SIGALRM's timer overflows near 1e308 s)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise DecodeTimeout inside the block once it has run `seconds` (SIGALRM, so in the main thread only;
    elsewhere no limit). Python code is interrupted where it is; a single C call that never returns is not
    (the supervisor's liveness check restarts such a PS)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise DecodeTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def entry_point(method):
    """Guard a Run method that the PS loop calls: an exception fails the run (`Run.crash`), never the PS."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.crash(method.__name__, exc)
            return None

    return guarded


@dataclass
class WorkerInfo:
    """A registered worker as the PS sees it (the control protocol's worker object)."""

    id: str
    peer: bytes
    address: str = ""
    device: str = ""
    metrics_port: int | None = None
    pid: int | None = None
    session: str | None = None  # the registering process's own token: a new one is a new process under this id
    last_seen: float = 0.0  # monotonic
    last_heartbeat: float = 0.0  # unix time
    state: str = "idle"  # idle, training, lost
    synced_step: int | None = None  # the step of the current run that this worker's replica holds

    def public(self, run_id: str | None) -> dict:
        return {
            "id": self.id,
            "address": self.address,
            "device": self.device,
            "state": self.state,
            "last_heartbeat": self.last_heartbeat,
            "run": run_id if self.state == "training" else None,
            "metrics_port": self.metrics_port,
            "pid": self.pid,
        }


@dataclass
class Accepted:
    worker: str
    frames: list
    messages: list
    nbytes: int
    arrived: float
    loss: float
    timings: dict


@dataclass
class StepState:
    """What the PS collects during one step."""

    participants: set[str] = field(default_factory=set)
    accepted: list[Accepted] = field(default_factory=list)
    k: int = 0
    published_at: float = 0.0
    decode_s: float = 0.0
    joined: dict[str, float] = field(default_factory=dict)  # participant -> when it joined the step (monotonic)


class Run:
    """A run's training state machine; `ps` provides send(), workers, drop(), event counters and metrics."""

    def __init__(self, ps, run_id: str, spec: RunSpec, rundir: RunDirectory, device: torch.device):
        self.ps = ps
        self.run_id = run_id
        self.spec = spec
        self.rundir = rundir
        self.device = device
        self.labels = (run_id, spec.codec.name)
        self.plugin = spec.codec.name if spec.codec.name not in CODECS else None  # a plugin codec's name
        self.state = "starting"
        self.error: str | None = None
        self.step = 0
        self.total_steps = spec.steps  # known for sure once the data set is loaded
        self.replica: Replica | None = None
        self.evaluator: Evaluator | None = None
        self.shards: dict[int, str] = {}
        self.current = StepState()
        self.records: deque[dict] = deque(maxlen=RECORDS_IN_MEMORY)  # older ones are read from metrics.jsonl
        self.timing_sums: dict[str, list[float]] = {k: [0.0, 0] for k in MEAN_TIMINGS}
        self.unflushed: list[dict] = []
        self.pending_evals: set[int] = set()
        self.totals = {"bytes_up": 0, "bytes_down": 0, "dense_bytes": 0}
        self.wall_before = 0.0  # wall seconds of earlier lives of this run (resumed from a checkpoint)
        self.started = time.time()
        self.started_at = self.started
        self.finished_at: float | None = None
        self.waiting_since = time.monotonic()
        self.finishing = False
        self.check: tuple[int, str] | None = None
        self.checkpoint_step = 0
        self.replica_checks = 0
        self.replica_mismatches = 0
        self.last_loss: float | None = None
        self.last_accuracy: float | None = None
        self.recent_step_s: deque[float] = deque(maxlen=RECENT_STEPS)
        self.timed_out: set[str] = set()  # workers out of this run for missing a step's deadline
        self.workers_at_start: int | None = None
        self.events: list[dict] = rundir.events()
        rundir.claim()
        self.write_error: Exception | None = None  # a failed write outside an entry point (see event())
        if not (rundir.path / "spec.json").exists():
            rundir.create(spec.model_dump(mode="json"))
        self.event("run_state", {"state": "starting"})
        self.prepared = False
        self.prepare_error: str | None = None
        threading.Thread(target=self._prepare, name="prepare-run", daemon=True).start()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Load the data set, build the model (seeded) and resume from the checkpoint, off the PS's loop."""
        try:
            self.device = run_device(self.spec.device, self.device)
            if self.plugin is not None:  # imported here, off the loop (and not under a decode's time limit)
                load_plugin(self.plugin)
            train, test, info = load_dataset(self.spec.dataset, self.ps.data_root, seed=self.spec.seed)
            torch.manual_seed(self.spec.seed)
            self.replica = Replica(self.spec, info.num_classes, info.in_channels, self.device)
            self.dense_gradient_bytes = self.replica.dense_bytes
            self.evaluator = Evaluator(
                self.spec.model, info.num_classes, info.in_channels, test, self.device, self.spec.eval_deferred
            )
            self._check_fits(train)
            self._resume()
            self.total_steps = self.spec.total_steps(len(train))
        except Exception as exc:  # a bad spec or a missing data set fails the run, not the PS
            log.exception("run %s could not be prepared", self.run_id)
            self.prepare_error = f"{type(exc).__name__} in prepare: {exc}"[:MAX_ERROR_CHARS]
            return
        self.waiting_since = time.monotonic()
        self.prepared = True

    def _check_fits(self, train) -> None:
        """Each worker's batch must fit in its shard of the training set (the workers would refuse the run)."""
        per_worker = self.spec.batch_size // self.spec.workers
        for shard in range(self.spec.workers):
            try:
                BatchStream(train, shard, self.spec.workers, per_worker, self.spec.seed)
            except ValueError as exc:
                raise ValueError(
                    f"batch_size {self.spec.batch_size} over {self.spec.workers} workers does not fit "
                    f"{self.spec.dataset} ({len(train)} training examples): shard {shard}: {exc}"
                ) from None

    def _resume(self) -> None:
        checkpoint = self.rundir.load_checkpoint()
        if checkpoint is None:
            return
        self.replica.model.load_state_dict(checkpoint["model"])
        self.replica.optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.step = self.checkpoint_step = int(checkpoint["step"])
        self.totals = dict(checkpoint["totals"])
        self.wall_before = float(checkpoint["wall_s"])
        self.started_at = float(checkpoint["started_at"])
        try:
            self.rundir.rewind_metrics(self.step, self._replay)
        except BaseException:  # metrics.jsonl is as it was (a full disk): forget the part replayed
            self.records.clear()
            self.timing_sums = {k: [0.0, 0] for k in MEAN_TIMINGS}
            self.last_loss = self.last_accuracy = None
            raise
        self.event("resumed", {"step": self.step})

    def _replay(self, record: dict) -> None:
        """A record of an earlier life of this run, read back on resume: its figures count again, and the
        last RECORDS_IN_MEMORY are kept in memory (metrics_since reads older ones from metrics.jsonl)."""
        self._add_timings(record)
        self.records.append(record)
        self.last_loss = record["loss"]
        if "test_accuracy" in record:
            self.last_accuracy = record["test_accuracy"]

    def event(self, kind: str, detail: dict) -> None:
        """Record an event. The PS calls this outside the guarded entry points too (a worker rejoining), so a
        failed write does not raise here: the run fails with it at its next tick."""
        event = {"seq": len(self.events) + 1, "time": time.time(), "type": kind, "detail": detail}
        self.events.append(event)
        log.info("run %s: %s %s", self.run_id, kind, detail)
        try:
            self.rundir.append_event(event)
        except Exception as exc:
            log.exception("run %s: events.jsonl not written", self.run_id)
            self.write_error = self.write_error or exc

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self._state_event()

    def _state_event(self) -> None:
        detail = {"state": self.state, "step": self.step}
        if self.error:
            detail["error"] = self.error
        self.event("run_state", detail)

    @property
    def final(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    def wall_s(self) -> float:
        return self.wall_before + time.time() - self.started

    def live_workers(self) -> list[WorkerInfo]:
        return [w for w in self.ps.workers.values() if w.state != "lost"]

    @entry_point
    def tick(self, now: float) -> None:
        """Called by the PS loop: start when workers are there, collect evaluations, end, time out."""
        if self.final:
            return
        if self.write_error is not None:
            self.crash("event", self.write_error)
            return
        if not self.prepared:
            if self.prepare_error is not None:
                self._end("failed", self.prepare_error)
            return
        self._collect_evaluations()
        if self.final:  # an evaluation found the run diverged
            return
        if self.finishing:
            if not self.pending_evals:
                self._end("succeeded")
            return
        if self.state == "starting":
            live = self.live_workers()
            waited = now - self.waiting_since
            if len(live) >= self.spec.workers or (len(live) >= self.spec.min_workers and waited > START_GRACE_S):
                self._start(live)
            elif len(live) < self.spec.min_workers and waited > self.ps.worker_timeout_s:
                self._too_few_workers(len(live))
        elif len(self.current.participants) < self.spec.min_workers:
            if now - self.waiting_since > self.ps.worker_timeout_s:
                self._too_few_workers(len(self.current.participants))
        else:
            self.waiting_since = now
            self._time_out_stragglers(now)

    def _start(self, live: list[WorkerInfo]) -> None:
        """Start training with the live workers (one per shard); say so when there are fewer than asked for."""
        self.started = time.time()  # wall_s counts training time, not the wait for workers
        self._set_state("running")
        for w in live:
            self._join(w)
        self.workers_at_start = len(self.shards)
        if self.workers_at_start < self.spec.workers:
            waiting = [s for s in range(self.spec.workers) if s not in self.shards]
            shards = ",".join(map(str, waiting))
            self.event(
                "started_with_fewer_workers",
                {
                    "workers": self.workers_at_start,
                    "requested": self.spec.workers,
                    "waiting_shards": waiting,
                    "message": f"started with {self.workers_at_start} of {self.spec.workers} workers; "
                    f"shard{'s' if len(waiting) > 1 else ''} {shards} wait{'' if len(waiting) > 1 else 's'} "
                    "for workers",
                },
            )
        self._publish_all()

    def _too_few_workers(self, count: int) -> None:
        self._end(
            "failed",
            f"fewer than min_workers={self.spec.min_workers} workers ({count}) for {self.ps.worker_timeout_s:.0f} s"
            + (": the run never started" if self.state == "starting" else ""),
        )

    @entry_point
    def cancel(self) -> None:
        if not self.final:
            self._end("cancelled")

    def crash(self, where: str, exc: Exception) -> None:
        """An exception inside the run: log its traceback and fail the run with its type and message (a
        PluginFailure's message says it all)."""
        log.error("run %s: %s raised", self.run_id, where, exc_info=exc)
        error = str(exc) if isinstance(exc, PluginFailure) else f"{type(exc).__name__} in {where}: {exc}"
        self._end("failed", error[:MAX_ERROR_CHARS])

    def _diverged(self, what: str, step: int | None = None) -> None:
        self._end("failed", f"training diverged at step {self.step if step is None else step}: {what}")

    def _end(self, state: str, error: str | None = None) -> None:
        """End the run. The state is set first, so the run is final whatever happens next; each of the
        following actions is attempted on its own, and one that raises is logged (never a second end)."""
        if self.final:
            return
        self.state, self.error, self.finished_at = state, error, time.time()
        actions = {
            "flush the metrics": lambda: self._flush(force=True),
            "record the state": self._state_event,
            "stop the workers": lambda: self._stop_workers(state),
            # without waiting: a long evaluation of a cancelled or failed run must not stall the PS's loop
            "stop the evaluator": lambda: self.evaluator is not None and self.evaluator.close(timeout_s=0),
            "write summary.json": lambda: self.rundir.write_summary(self.summary()),
        }
        for what, action in actions.items():
            try:
                action()
            except Exception:
                log.exception("run %s (%s): could not %s", self.run_id, state, what)

    def _stop_workers(self, reason: str) -> None:
        for w in self.ps.workers.values():
            if w.state == "training":
                self.ps.send(w, Header(MsgType.STOP, self.run_id, self.step, meta={"reason": reason}))
                w.state = "idle"
            w.synced_step = None
        self.shards.clear()

    # -- workers -------------------------------------------------------------------------------------------

    @entry_point
    def on_worker_ready(self, w: WorkerInfo) -> None:
        """A worker registered (or registered again): give it a shard and the state if the run is running."""
        self._offer(w)

    def _offer(self, w: WorkerInfo) -> None:
        """A shard and the state for `w` while the run is running, unless it was timed out of this run."""
        if self.state == "running" and not self.finishing and w.id not in self.timed_out:
            stalled = len(self.current.participants) < self.spec.min_workers
            if self._join(w):
                compute = stalled or (w.id in self.current.participants and not self._contributed(w.id))
                if compute:
                    self.current.participants.add(w.id)
                    self.current.joined.setdefault(w.id, time.monotonic())
                    self.current.k = self._k()
                self._send_state(w, compute)

    def _join(self, w: WorkerInfo) -> bool:
        """Give `w` a shard (its previous one if free); False when every shard is taken."""
        mine = [s for s, owner in self.shards.items() if owner == w.id]
        if not mine:
            free = [s for s in range(self.spec.workers) if s not in self.shards]
            if not free:
                return False
            self.shards[free[0]] = w.id
            self.event("worker_joined", {"worker": w.id, "shard": free[0], "step": self.step})
        w.state = "training"
        w.synced_step = None
        return True

    @entry_point
    def on_worker_lost(self, w: WorkerInfo) -> None:
        self._release(w, "worker_lost", {})

    def _release(self, w: WorkerInfo, kind: str, detail: dict) -> None:
        """`w` leaves the run (lost or timed out): its shard is freed for an idle worker, and the step goes on
        without it if it has not contributed."""
        for s in [s for s, owner in self.shards.items() if owner == w.id]:
            del self.shards[s]
            self.event(kind, {"worker": w.id, "shard": s, "step": self.step, **detail})
        w.synced_step = None
        if self.state != "running" or self.finishing:
            return
        if not self._contributed(w.id):
            self.current.participants.discard(w.id)
            self.current.k = self._k()
            self._maybe_finish_step()
        self.waiting_since = time.monotonic()
        for idle in self.live_workers():
            if idle.state == "idle":
                self._offer(idle)

    def step_deadline_s(self) -> float:
        """How long a participant may take to send its gradient of a step."""
        recent = statistics.median(self.recent_step_s) if self.recent_step_s else 0.0
        return max(self.ps.step_timeout_s, STEP_TIMEOUT_FACTOR * recent)

    def _time_out_stragglers(self, now: float) -> None:
        """Participants that missed the step's deadline (counted from when each joined the step) leave the run."""
        step = self.current
        limit = self.step_deadline_s()
        late = [
            wid
            for wid in step.participants
            if not self._contributed(wid) and now - step.joined.get(wid, step.published_at) > limit
        ]
        for wid in late:
            w = self.ps.workers[wid]  # participants are registered workers (the PS never forgets one)
            self.timed_out.add(wid)
            self.ps.send(w, Header(MsgType.STOP, self.run_id, self.step, meta={"reason": "timed out"}))
            w.state = "idle"
            waited = round(now - step.joined.get(wid, step.published_at), 1)
            self._release(w, "worker_timed_out", {"waited_s": waited, "deadline_s": round(limit, 1)})
            if self.final or self.current is not step:
                return

    def shard_of(self, worker_id: str) -> int:
        return next(s for s, owner in self.shards.items() if owner == worker_id)

    def _contributed(self, worker_id: str) -> bool:
        return any(a.worker == worker_id for a in self.current.accepted)

    def _k(self) -> int:
        target = self.spec.num_aggregate or len(self.current.participants)
        return min(target, len(self.current.participants))

    # -- publishing ----------------------------------------------------------------------------------------

    def _run_meta(self, w: WorkerInfo, compute: bool, has_momentum: bool) -> dict:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "shard": self.shard_of(w.id),
            "num_shards": self.spec.workers,
            "has_momentum": has_momentum,
            "compute": compute,
            "check": self.check is not None and self.check[0] == self.step,
        }

    def _send_state(self, w: WorkerInfo, compute: bool, frames=None) -> int:
        if frames is None:
            frames = self.replica.state_messages(with_momentum=self.spec.downlink == "atoms")
        messages, has_momentum = frames
        header = Header(MsgType.RUN, self.run_id, self.step, meta=self._run_meta(w, compute, has_momentum))
        sent = self.ps.send(w, header, messages)
        w.synced_step = self.step if sent else None
        return sent

    def _publish_all(self) -> None:
        """Start step `self.step` with every worker that holds a shard: the full state to each."""
        self._begin_step()
        frames = self.replica.state_messages(with_momentum=self.spec.downlink == "atoms")
        for w in self._shard_holders():
            self._send_state(w, compute=True, frames=frames)

    def _shard_holders(self) -> list[WorkerInfo]:
        return [self.ps.workers[owner] for owner in self.shards.values()]

    def _begin_step(self) -> None:
        self.current = StepState(published_at=time.monotonic())
        self.current.participants = {w.id for w in self._shard_holders()}
        self.current.joined = dict.fromkeys(self.current.participants, self.current.published_at)
        self.current.k = self._k()
        self.replica.begin_step()
        self.waiting_since = time.monotonic()
        if self.spec.downlink == "atoms" and self.step % self.ps.check_every == 0:
            self.check = (self.step, self.replica.digest())

    # -- gradients -----------------------------------------------------------------------------------------

    @entry_point
    def on_gradient(self, w: WorkerInfo, received) -> None:
        header = received.header
        reason = self._reject_reason(w, header)
        if reason is not None:
            self.ps.drop(reason, w.id, f"gradient of step {header.step}")
            if reason == "diverged":
                self._diverged(
                    f"worker {w.id}'s training loss is not finite (lower lr, or use a codec with less variance)",
                    header.step,
                )
            return
        start = time.perf_counter()
        try:
            with self.decoding(f"worker {w.id}'s gradient of step {header.step}"):
                messages = self.replica.parse_gradient(received.frames)
                self.replica.accumulate(messages)
        except GradientError as exc:
            self.ps.drop(exc.reason, w.id, str(exc))
            if exc.reason == "bad_payload" and self.replica.summed:  # the sums may be partial: redo them
                with self.decoding(f"the gradients of step {self.step} again"):
                    self.replica.rebuild([a.messages for a in self.current.accepted])
            return
        decode_s = time.perf_counter() - start
        self.current.decode_s += decode_s
        self.ps.observe("atomo_ps_decode_seconds", self.labels, decode_s)
        self.ps.observe("atomo_ps_received_bytes_total", self.labels, received.nbytes, counter=True)
        self.current.accepted.append(
            Accepted(
                w.id, received.frames, messages, received.nbytes, time.monotonic(), header.meta["loss"], header.timings
            )
        )
        self._check_digest(w, header.meta)
        self._maybe_finish_step()

    @contextlib.contextmanager
    def decoding(self, what: str):
        """Decode `what` inside the block. With a plugin codec, under the PS's time limit, and a failure of the
        plugin (the time limit, a message it rejects or names the wrong shape of, any exception it raises)
        is a PluginFailure, which fails the run; a gradient with the wrong frame count or non-finite values
        is dropped, as with the built-in codecs."""
        if self.plugin is None:
            yield
            return
        limit = self.ps.plugin_decode_timeout_s
        try:
            with time_limit(limit):
                yield
        except DecodeTimeout:
            raise PluginFailure(
                f"plugin codec {self.plugin!r} did not decode {what} within {limit:g} s (hung or too slow; "
                "the PS's --plugin-decode-timeout-s)"
            ) from None
        except GradientError as exc:
            if exc.reason in ("bad_frames", "non_finite"):
                raise
            raise PluginFailure(f"plugin codec {self.plugin!r} could not decode {what}: {exc}") from exc
        except Exception as exc:
            raise PluginFailure(
                f"plugin codec {self.plugin!r} could not decode {what}: {type(exc).__name__}: {exc}"
            ) from exc

    def _reject_reason(self, w: WorkerInfo, header: Header) -> str | None:
        if header.run_id != self.run_id or self.state != "running" or self.finishing:
            return "wrong_run"
        if header.step < self.step:
            return "late"
        if header.step > self.step:
            return "bad_step"
        if w.id not in self.current.participants:
            return "unexpected"
        if self._contributed(w.id):
            return "duplicate"
        if len(self.current.accepted) >= self.current.k:
            return "late"
        # protocol.unpack_header checked the meta's values (loss finite and bounded, or null; digest with its
        # step); the run also needs the loss to be there.
        if "loss" not in header.meta:
            return "bad_meta"
        if header.meta["loss"] is None:  # the worker's loss was NaN, infinite or beyond the protocol's bound
            return "diverged"
        return None

    def _check_digest(self, w: WorkerInfo, meta: dict) -> None:
        """Replicas checked: a worker's digest of step s must equal the PS's; if not, it gets the state again."""
        if self.check is None or meta.get("digest_step") != self.check[0]:
            return
        self.replica_checks += 1
        if meta["digest"] != self.check[1]:
            self.replica_mismatches += 1
            w.synced_step = None
            self.event("replica_resync", {"worker": w.id, "step": self.check[0]})

    def _maybe_finish_step(self) -> None:
        step = self.current
        if step.k < 1 or len(step.accepted) < step.k or len(step.participants) < self.spec.min_workers:
            return  # below min_workers the run waits for workers to join (tick() fails it after a timeout)
        if not self.replica.sums_finite():  # a finite payload that decodes to inf: find it, leave it out
            with self.decoding(f"the gradients of step {self.step} again"):
                bad = self.replica.rebuild([a.messages for a in step.accepted])
            for i in bad:
                self.ps.drop("non_finite", step.accepted[i].worker, "gradient decodes to non-finite values")
                step.participants.discard(step.accepted[i].worker)
            step.accepted = [a for i, a in enumerate(step.accepted) if i not in bad]
            step.k = self._k()
            if step.k < 1 or len(step.accepted) < step.k:
                return
        kth = step.accepted[step.k - 1].arrived
        update_start = time.perf_counter()
        lr = learning_rate(self.spec, self.step, self.total_steps)
        self.replica.finish_step(lr)
        self.step += 1
        if not self.replica.model_finite():  # never checkpointed, evaluated or sent
            self._diverged("the model's parameters are not finite after the update")
            return
        update_s = time.perf_counter() - update_start
        record = self._record(step, lr, kth, update_s)
        bad = non_finite(record)
        if bad:
            self.records.append(json_safe(record))
            self.unflushed.append(self.records[-1])
            self._diverged(f"non-finite {_describe({k: record[k] for k in bad})} in the step's record")
            return
        if self.step >= self.total_steps:
            self.finishing = True
        else:
            record["bytes_down"] = self._broadcast(step, lr)
        self.totals["bytes_down"] += record["bytes_down"]
        self.ps.observe("atomo_ps_update_seconds", self.labels, time.perf_counter() - update_start)
        self.ps.observe("atomo_ps_sent_bytes_total", self.labels, record["bytes_down"], counter=True)
        self._after_step(record)

    def _broadcast(self, done: StepState, lr: float) -> int:
        """Publish step `self.step`: the aggregated messages (atoms) or the model, to every shard holder."""
        aggregated = [a.worker for a in done.accepted]
        arrival = {a.worker: a.arrived for a in done.accepted}
        if self.spec.downlink == "atoms":
            frames = [f for a in done.accepted for f in a.frames]
        else:
            frames = self.replica.state_messages(with_momentum=False)[0]
        self._begin_step()
        state = None
        sent = 0
        now = time.monotonic()
        for w in self._shard_holders():
            in_step = w.synced_step == self.step - 1 or (self.spec.downlink == "model" and w.synced_step is not None)
            if not in_step:
                state = state or self.replica.state_messages(with_momentum=self.spec.downlink == "atoms")
                sent += self._send_state(w, compute=True, frames=state)
                continue
            meta = {
                "mode": self.spec.downlink,
                "k": len(aggregated),
                "workers": aggregated,
                "lr": lr,
                "compute": True,
                "check": self.check is not None and self.check[0] == self.step,
            }
            header = Header(
                MsgType.UPDATE, self.run_id, self.step, timings={"ps_s": now - arrival.get(w.id, now)}, meta=meta
            )
            n = self.ps.send(w, header, frames)
            w.synced_step = self.step if n else None
            sent += n
        return sent

    def _record(self, step: StepState, lr: float, kth: float, update_s: float) -> dict:
        accepted = step.accepted

        def mean(key: str) -> float | None:
            values = [a.timings[key] for a in accepted if key in a.timings]
            return sum(values) / len(values) if values else None

        bytes_up = sum(a.nbytes for a in accepted)
        dense = self.dense_gradient_bytes * len(accepted)
        self.totals["bytes_up"] += bytes_up
        self.totals["dense_bytes"] += dense
        wait_s = kth - step.published_at
        record = {
            "step": self.step,
            "time": time.time(),
            "wall_s": self.wall_s(),
            "loss": sum(a.loss for a in accepted) / len(accepted),
            "lr": lr,
            "k": len(accepted),
            "workers": len(self.live_workers()),
            "bytes_up": bytes_up,
            "bytes_down": 0,
            "dense_bytes": dense,
            "encode_s": mean("encode_s"),
            "compute_s": mean("compute_s"),
            "communication_s": mean("communication_s"),
            "wait_s": wait_s,
            "decode_s": step.decode_s,
            "update_s": update_s,
            "step_s": time.monotonic() - step.published_at,
        }
        self.ps.observe("atomo_ps_wait_seconds", self.labels, wait_s)
        self.ps.observe("atomo_ps_step_seconds", self.labels, record["step_s"])
        self.ps.set_gauge("atomo_run_step", self.labels, self.step)
        self.ps.set_gauge("atomo_run_loss", self.labels, record["loss"])
        if bytes_up:
            self.ps.set_gauge("atomo_run_compression_ratio", self.labels, dense / bytes_up)
        self.last_loss = record["loss"]
        self.recent_step_s.append(record["step_s"])
        return record

    def _after_step(self, record: dict) -> None:
        s = self.step
        if s % self.spec.eval_every == 0 or s >= self.total_steps:
            self.pending_evals.add(s)
            released = self.evaluator.released.is_set()
            self.evaluator.submit(s, {k: v.detach().clone() for k, v in self.replica.model.state_dict().items()})
            if not released and self.evaluator.released_early:
                self.event("evaluation_not_deferred", {"step": s, "held_bytes": self.evaluator.held_bytes})
        if s >= self.total_steps:
            self.evaluator.release()  # deferred evaluations start after the last step
        self.records.append(record)
        self._add_timings(record)
        self.unflushed.append(record)
        self._flush()
        if s % self.spec.checkpoint_every == 0 or s >= self.total_steps:
            self.save_checkpoint()
        if self.finishing:
            self._stop_workers("finished")

    def _collect_evaluations(self) -> None:
        for step, accuracy, loss in self.evaluator.results():
            self.pending_evals.discard(step)
            record = next(r for r in reversed(self.records) if r["step"] == step)
            result = {"test_accuracy": accuracy, "test_loss": loss}
            record.update(json_safe(result))
            bad = non_finite(result)
            if bad:
                self._diverged(f"non-finite {_describe({k: result[k] for k in bad})} from the evaluation", step)
                return
            self.last_accuracy = accuracy
            self.ps.set_gauge("atomo_run_test_accuracy", self.labels, accuracy)
        self._flush()

    def _flush(self, force: bool = False) -> None:
        """Write the records in step order; a record waits for its evaluation unless forced."""
        ready = len(self.unflushed)
        if not force and self.pending_evals:
            first_pending = min(self.pending_evals)
            ready = sum(1 for r in self.unflushed if r["step"] < first_pending)
        self.rundir.append_metrics(self.unflushed[:ready])
        self.unflushed = self.unflushed[ready:]

    def save_checkpoint(self) -> None:
        """Model, optimizer (momentum), step, RNG state and totals, written atomically."""
        self.checkpoint_step = self.step
        self.rundir.save_checkpoint(
            {
                "run_id": self.run_id,
                "step": self.step,
                "model": self.replica.model.state_dict(),
                "optimizer": self.replica.optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "totals": dict(self.totals),
                "wall_s": self.wall_s(),
                "started_at": self.started_at,
            }
        )

    # -- reports -------------------------------------------------------------------------------------------

    def public(self) -> dict:
        """The control protocol's run object."""

        def mean(key: str) -> float | None:
            total, count = self.timing_sums[key]
            return total / count if count else None

        up = self.totals["bytes_up"]
        return json_safe(
            {
                "run_id": self.run_id,
                "state": self.state,
                "step": self.step,
                "total_steps": self.total_steps,
                "loss": self.last_loss,
                "test_accuracy": self.last_accuracy,
                "bytes_up": up,
                "bytes_down": self.totals["bytes_down"],
                "compression_ratio": self.totals["dense_bytes"] / up if up else None,
                "mean_encode_s": mean("encode_s"),
                "mean_compute_s": mean("compute_s"),
                "mean_communication_s": mean("communication_s"),
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "error": self.error,
                "workers_training": len(self.shards),
                "workers_at_start": self.workers_at_start,
            }
        )

    def summary(self) -> dict:
        return {
            **self.public(),
            "wall_s": self.wall_s(),
            "dense_bytes": self.totals["dense_bytes"],
            "replica_checks": self.replica_checks,
            "replica_mismatches": self.replica_mismatches,
            "timed_out_workers": sorted(self.timed_out),
            "spec": self.spec.model_dump(mode="json"),
        }

    def _add_timings(self, record: dict) -> None:
        for key in MEAN_TIMINGS:
            if record.get(key) is not None:
                self.timing_sums[key][0] += record[key]
                self.timing_sums[key][1] += 1

    def metrics_since(self, since: int, limit: int) -> list[dict]:
        """The first `limit` records with step > since: from memory, or streamed from metrics.jsonl for
        steps no longer held."""
        if self.records and since >= self.records[0]["step"] - 1:
            return [r for r in self.records if r["step"] > since][:limit]
        flushed = list(itertools.islice((r for r in self.rundir.metrics() if r["step"] > since), limit))
        last = flushed[-1]["step"] if flushed else since
        return (flushed + [r for r in self.records if r["step"] > last])[:limit]
