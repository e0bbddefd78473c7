"""One training run on the PS: synchronous data-parallel SGD with encoded gradients (Section 2).

Each step t: the PS publishes the state of step t; every participating worker sends the encoded gradient
of its batch; the PS decodes and sums the first k gradients as they arrive (late ones are dropped),
takes the optimizer step with their mean (`Replica.finish_step`, the same code the workers run in the
`atoms` downlink) and publishes step t+1: the k messages it aggregated, forwarded unchanged (`atoms`), or the
dense model (`model`). Workers whose replica is not at step t get the full state instead (a RUN message).

k is `num_aggregate` or, by default, every live participant of the step. A worker that joins mid-run gets
the state and computes from the next step on; a lost worker's shard waits for the next worker that joins.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from atomo_core.data import load_dataset
from services.common.protocol import Header, MsgType
from services.common.replica import GradientError, Replica, learning_rate, run_device
from services.common.spec import RunSpec
from services.ps.evaluate import Evaluator
from services.ps.rundir import RunDirectory

log = logging.getLogger("atomo.ps")

START_GRACE_S = 10.0
RECORDS_IN_MEMORY = 10_000
MEAN_TIMINGS = (
    "encode_s",
    "compute_s",
    "communication_s",
)  # after this long, a run starts with min_workers instead of waiting for all workers


@dataclass
class WorkerInfo:
    """A registered worker as the PS sees it (the control protocol's worker object)."""

    id: str
    peer: bytes
    address: str = ""
    device: str = ""
    metrics_port: int | None = None
    pid: int | None = None
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


class Run:
    """A run's training state machine; `ps` provides send(), workers, drop(), event counters and metrics."""

    def __init__(self, ps, run_id: str, spec: RunSpec, rundir: RunDirectory, device: torch.device):
        self.ps = ps
        self.run_id = run_id
        self.spec = spec
        self.rundir = rundir
        self.device = device
        self.labels = (run_id, spec.codec.name)
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
        self.events: list[dict] = rundir.events()
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
            train, test, info = load_dataset(self.spec.dataset, self.ps.data_root, seed=self.spec.seed)
            torch.manual_seed(self.spec.seed)
            self.replica = Replica(self.spec, info.num_classes, info.in_channels, self.device)
            self.dense_gradient_bytes = self.replica.dense_bytes
            self.evaluator = Evaluator(self.spec.model, info.num_classes, info.in_channels, test, self.device)
            self._resume()
            self.total_steps = self.spec.total_steps(len(train))
        except Exception as exc:  # a bad spec or a missing data set fails the run, not the PS
            log.exception("run %s could not be prepared", self.run_id)
            self.prepare_error = f"{type(exc).__name__}: {exc}"
            return
        self.waiting_since = time.monotonic()
        self.prepared = True

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
        records = [r for r in self.rundir.metrics() if r["step"] <= self.step]
        (self.rundir.path / "metrics.jsonl").unlink(missing_ok=True)
        self.rundir.append_metrics(records)
        for record in records:
            self._add_timings(record)
        self.records.extend(records)
        if records:
            self.last_loss = records[-1]["loss"]
            accuracies = [r["test_accuracy"] for r in records if "test_accuracy" in r]
            self.last_accuracy = accuracies[-1] if accuracies else None
        self.event("resumed", {"step": self.step})

    def event(self, kind: str, detail: dict) -> None:
        event = {"seq": len(self.events) + 1, "time": time.time(), "type": kind, "detail": detail}
        self.events.append(event)
        self.rundir.append_event(event)
        log.info("run %s: %s %s", self.run_id, kind, detail)

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        detail = {"state": state, "step": self.step}
        if error:
            detail["error"] = error
        self.event("run_state", detail)

    @property
    def final(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    def wall_s(self) -> float:
        return self.wall_before + time.time() - self.started

    def live_workers(self) -> list[WorkerInfo]:
        return [w for w in self.ps.workers.values() if w.state != "lost"]

    def tick(self, now: float) -> None:
        """Called by the PS loop: start when workers are there, collect evaluations, end, time out."""
        if self.final:
            return
        if not self.prepared:
            if self.prepare_error is not None:
                self._end("failed", self.prepare_error)
            return
        self._collect_evaluations()
        if self.finishing:
            if not self.pending_evals:
                self._end("succeeded")
            return
        if self.state == "starting":
            live = self.live_workers()
            waited = now - self.waiting_since
            if len(live) >= self.spec.workers or (len(live) >= self.spec.min_workers and waited > START_GRACE_S):
                self.started = time.time()  # wall_s counts training time, not the wait for workers
                self._set_state("running")
                for w in live:
                    self._join(w)
                self._publish_all()
        elif len(self.current.participants) < self.spec.min_workers:
            if now - self.waiting_since > self.ps.worker_timeout_s:
                self._end(
                    "failed",
                    f"fewer than min_workers={self.spec.min_workers} workers for {self.ps.worker_timeout_s:.0f} s",
                )
        else:
            self.waiting_since = now

    def cancel(self) -> None:
        if not self.final:
            self._end("cancelled")

    def _end(self, state: str, error: str | None = None) -> None:
        self.finished_at = time.time()
        self._flush(force=True)
        self._set_state(state, error)
        self._stop_workers(state)
        if self.evaluator is not None:
            self.evaluator.close()
        self.rundir.write_summary(self.summary())

    def _stop_workers(self, reason: str) -> None:
        for w in self.ps.workers.values():
            if w.state == "training":
                self.ps.send(w, Header(MsgType.STOP, self.run_id, self.step, meta={"reason": reason}))
                w.state = "idle"
            w.synced_step = None
        self.shards.clear()

    # -- workers -------------------------------------------------------------------------------------------

    def on_worker_ready(self, w: WorkerInfo) -> None:
        """A worker registered (or registered again): give it a shard and the state if the run is running."""
        if self.state == "running" and not self.finishing:
            stalled = len(self.current.participants) < self.spec.min_workers
            if self._join(w):
                compute = stalled or (w.id in self.current.participants and not self._contributed(w.id))
                if compute:
                    self.current.participants.add(w.id)
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

    def on_worker_lost(self, w: WorkerInfo) -> None:
        for s in [s for s, owner in self.shards.items() if owner == w.id]:
            del self.shards[s]
            self.event("worker_lost", {"worker": w.id, "shard": s, "step": self.step})
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
                self.on_worker_ready(idle)

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
        self.current.k = self._k()
        self.replica.begin_step()
        self.waiting_since = time.monotonic()
        if self.spec.downlink == "atoms" and self.step % self.ps.check_every == 0:
            self.check = (self.step, self.replica.digest())

    # -- gradients -----------------------------------------------------------------------------------------

    def on_gradient(self, w: WorkerInfo, received) -> None:
        header = received.header
        reason = self._reject_reason(w, header)
        if reason is not None:
            self.ps.drop(reason, w.id, f"gradient of step {header.step}")
            if reason == "diverged":
                self._end(
                    "failed",
                    f"training diverged at step {header.step}: worker {w.id}'s loss is not finite "
                    "(lower lr, or use a codec with less variance)",
                )
            return
        start = time.perf_counter()
        try:
            messages = self.replica.parse_gradient(received.frames)
            self.replica.accumulate(messages)
        except GradientError as exc:
            self.ps.drop(exc.reason, w.id, str(exc))
            if exc.reason == "bad_payload" and self.replica.summed:  # the sums may be partial: redo them
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
        loss = header.meta.get("loss")
        if loss is None and "loss" in header.meta:  # the worker's loss was NaN or infinite
            return "diverged"
        if type(loss) not in (int, float) or not math.isfinite(loss):
            return "bad_meta"
        digest = header.meta.get("digest")
        if digest is not None and (not isinstance(digest, str) or type(header.meta.get("digest_step")) is not int):
            return "bad_meta"
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
        update_s = time.perf_counter() - update_start
        record = self._record(step, lr, kth, update_s)
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
        return record

    def _after_step(self, record: dict) -> None:
        s = self.step
        if s % self.spec.eval_every == 0 or s >= self.total_steps:
            self.pending_evals.add(s)
            self.evaluator.submit(s, {k: v.detach().clone() for k, v in self.replica.model.state_dict().items()})
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
            record["test_accuracy"], record["test_loss"] = accuracy, loss
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
        return {
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
        }

    def summary(self) -> dict:
        return {
            **self.public(),
            "wall_s": self.wall_s(),
            "dense_bytes": self.totals["dense_bytes"],
            "replica_checks": self.replica_checks,
            "replica_mismatches": self.replica_mismatches,
            "spec": self.spec.model_dump(mode="json"),
        }

    def _add_timings(self, record: dict) -> None:
        for key in MEAN_TIMINGS:
            if record.get(key) is not None:
                self.timing_sums[key][0] += record[key]
                self.timing_sums[key][1] += 1

    def metrics_since(self, since: int) -> list[dict]:
        """Records with step > since: from memory, or from metrics.jsonl for steps no longer held."""
        if not self.records or since >= self.records[0]["step"] - 1:
            return [r for r in self.records if r["step"] > since]
        flushed = [r for r in self.rundir.metrics() if r["step"] > since]
        last = flushed[-1]["step"] if flushed else since
        return flushed + [r for r in self.records if r["step"] > last]
