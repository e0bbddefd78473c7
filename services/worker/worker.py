"""The worker loop: register, receive the run's state, then per step compute, encode and send a gradient.

Section 2: worker i draws a mini-batch of batch_size / workers examples from its own shard, computes the
stochastic gradient g_i, encodes it with the run's codec (the ATOMO sparsification of Section 3, per layer)
and sends it to the PS. The PS answers each step with an UPDATE: the k gradient messages it averaged
(`atoms` downlink; this worker then runs the PS's own SGD step, `services.common.replica`) or the dense
model (`model` downlink, the paper's setup).

The socket belongs to the main thread, which also sends heartbeats; applying what the PS sent (loading
the data set, the state, the SGD step), the forward and backward pass and the encoding run as jobs of one
background thread, so that a long step never silences the heartbeats.

Error feedback (the BIASED codecs topk and powersgd, atomo_core/biased): the run's `LayerPolicy` keeps each
layer's residual (and PowerSGD's warm start) in this process. The policy is built per run assignment, so the
memory is this worker's for this run and shard: a new run or shard starts from zero; the first `dense_steps`
and a gradient sent dense after a failed encoding leave it untouched. It is lost when the worker restarts,
which then starts again from zero residuals (still a valid error-feedback run; what was held back is lost).
A gradient lost on the way (dropped, or past the PS's step deadline) takes what it sent with it. The warm
spectral basis of svd with basis "warm" (each layer's Q) is per-layer state of the same policy, kept and lost
the same way; a worker that restarts starts the warm route afresh (Q from Y times a random matrix), which
costs a little variance for one step, never bias (the estimate is unbiased for any Q).

Communication time (atomo_worker_communication_seconds): from sending the gradient of step t until the
update of step t+1 is in hand, minus `ps_s`, the time the PS held this worker's gradient (waiting for the
other gradients of the step, decoding, the optimizer step), which the PS reports in the update's header.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zmq
from torch.nn import functional as F

from atomo_core import LayerPolicy, make_codec
from atomo_core.data import BatchStream, load_dataset
from services.common import metrics
from services.common.protocol import MAX_LOSS, Header, MsgType
from services.common.replica import GradientError, Replica, max_frame_bytes, resolve_device, run_device
from services.common.spec import RunSpec
from services.common.transport import Client, CurveKeys, MalformedMessage, QueueFull, SocketOptions, connect_client

log = logging.getLogger("atomo.worker")

POLL_WHILE_BUSY_MS = 2
MAX_DEFERRED = 32
HINT_AFTER_REGISTRATIONS = 5  # unanswered registrations in a row before the hint about keys is logged
DENSE_POLICY = LayerPolicy(make_codec("dense"))


def step_generator(seed: int, shard: int, step: int) -> torch.Generator:
    """The sampling randomness of one worker's step: a generator seeded from (seed, shard, step)."""
    state = np.random.SeedSequence([seed, shard, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def gradient_policy(spec: RunSpec) -> LayerPolicy:
    """The run's per-layer policy: its codec for matrices and kernels, `vector_codec` for 1-D tensors."""
    codec = make_codec(spec.codec.name, **spec.codec.codec_params())
    vector_params = {}
    if spec.codec.vector_codec == "entrywise":
        vector_params = {"budget": spec.codec.budget_or_default, "atom_dtype": spec.codec.atom_dtype}
    vector_codec = make_codec(spec.codec.vector_codec, **vector_params)
    return LayerPolicy(codec, vector_codec, spec.codec.min_compression_rate)


def encode_gradient(run: Assignment, step: int, generator: torch.Generator, dense: bool = False) -> list:
    """One message per parameter gradient (the run's policy; dense during the first `dense_steps`), then the
    floating-point buffers dense (the PS averages BatchNorm statistics)."""
    replica = run.replica
    policy = DENSE_POLICY if dense or step < run.spec.dense_steps else run.policy
    messages = policy.encode([p.grad.detach() for p in replica.params], generator)
    return messages + DENSE_POLICY.encode([b.detach() for b in replica.buffers])


@dataclass
class Assignment:
    """The run this worker takes part in, from the PS's RUN message."""

    run_id: str
    spec: RunSpec
    shard: int
    num_shards: int
    replica: Replica
    stream: BatchStream
    policy: LayerPolicy


@dataclass
class Gradient:
    step: int
    frames: list
    loss: float
    compute_s: float
    encode_s: float


class Worker:
    """One worker process: `serve()` runs until `stop()` (SIGTERM/SIGINT)."""

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        device: str = "auto",
        keys: CurveKeys | None = None,
        heartbeat_s: float = 1.0,
        metrics_port: int | None = None,
        data_root: str | None = None,
    ):
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.device = resolve_device(device)
        self.heartbeat_s = heartbeat_s
        self.metrics_port = metrics_port
        self.data_root = data_root
        self.ctx = zmq.Context()
        options = SocketOptions(
            max_message_bytes=max_frame_bytes(),
            heartbeat_ivl_ms=int(heartbeat_s * 1000),
            max_frames=1 << 16,
            immediate=True,  # while the PS is away a send fails at once (QueueFull) instead of queuing
            linger_ms=100,  # a gradient still queued at shutdown is not worth waiting for
        )
        self.client: Client = connect_client(self.ctx, endpoint, worker_id, options, keys)
        self.metrics = metrics.create(metrics.WORKER_METRICS) if metrics_port is not None else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.datasets: dict[str, tuple] = {}
        self.run: Assignment | None = None
        self.step = -1  # the step the replica is at
        self.pending: Future | None = None
        self.deferred: list = []
        self.out_of_sync = False
        self.received: int | None = None
        self.sent_at = 0.0
        self.communication_s: float | None = None
        self.digest: tuple[int, str] | None = None
        self.last_from_ps = time.monotonic()
        self.ps_lost = False
        self.unanswered = 0  # registrations sent since the PS last said anything
        self.registered = False  # the last REGISTER went out (it is sent again until one does)
        self.session = secrets.token_hex(8)  # this process among those under its id (a container's pid repeats)
        self.keys = keys
        self.hinted = False
        self.stopping = False

    def stop(self, *_args) -> None:
        self.stopping = True

    # -- the loop ------------------------------------------------------------------------------------------

    def serve(self) -> None:
        self._register()
        next_heartbeat = time.monotonic() + self.heartbeat_s
        while not self.stopping:
            now = time.monotonic()
            timeout = POLL_WHILE_BUSY_MS if self.pending else max(1, int((next_heartbeat - now) * 1000))
            try:
                received = self.client.recv(min(timeout, 100))
            except MalformedMessage as exc:
                log.warning("malformed message from the PS dropped: %s", exc)
                received = None
            if received is not None:
                self.last_from_ps = time.monotonic()
                self.unanswered = 0
                if self.ps_lost:
                    log.info("the PS answers again")
                    self.ps_lost = False
                self._dispatch(received, self.last_from_ps)
            if self.pending is not None and self.pending.done():
                self._job_done(self.pending.result())
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_s
                self._heartbeat(now)
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
        self.ctx.term()

    def _heartbeat(self, now: float) -> None:
        """Heartbeat the PS; when it has been silent for three intervals, register again until it answers.

        Nothing goes before a REGISTER that went out: the PS takes any message under a registered worker id for
        that worker, so a restarted worker whose first REGISTER was dropped (the PS not connected yet) and who
        heart-beat instead would pass for its dead predecessor, and never get the state it waits for."""
        if not self.registered:
            self._register()
        elif now - self.last_from_ps > 3 * self.heartbeat_s:
            if not self.ps_lost:
                log.warning("no word from the PS for %.1f s: registering again until it answers", 3 * self.heartbeat_s)
                self.ps_lost = True
            self._register()
        else:
            self._send(Header(MsgType.HEARTBEAT, worker_id=self.worker_id))

    def _send(self, header: Header, frames=()) -> int:
        """Send without blocking; 0 when the PS is not connected or not reading (the message is dropped: a
        lost gradient is made up by the PS's step deadline or by registering again)."""
        try:
            return self.client.send(header, frames)
        except QueueFull:
            log.debug("%s not sent: the PS is not connected or not reading", header.type.name)
            return 0

    def _register(self) -> None:
        meta = {
            "device": self.device.type[:32],
            "address": socket.gethostname()[:256],
            "pid": os.getpid(),
            "session": self.session,
        }
        if self.metrics_port is not None:
            meta["metrics_port"] = self.metrics_port
        self.registered = self._send(Header(MsgType.REGISTER, worker_id=self.worker_id, meta=meta)) > 0
        self.unanswered += 1
        if self.unanswered >= HINT_AFTER_REGISTRATIONS and not self.hinted:
            self.hinted = True
            log.warning("%s", self.no_answer_hint())

    def no_answer_hint(self) -> str:
        """What to check when the PS never answers: most often, keys that do not match the PS's."""
        where = f"no answer from the PS at {self.endpoint} after {self.unanswered} registrations"
        if self.keys is None:
            return f"{where}: if it uses CURVE keys, pass --keys DIR --key-name NAME"
        return (
            f"{where}: check that the PS runs there and that this worker's CURVE keys are the PS's (its server.key, "
            "and this client's public key among the PS's clients/)"
        )

    def _dispatch(self, received, arrived: float) -> None:
        """RUN, UPDATE and STOP become jobs of the compute thread, one at a time, in arrival order."""
        kind = received.header.type
        if kind == MsgType.REJECT:
            log.info("the PS rejected a message (%s): registering again", received.header.meta.get("reason"))
            self._register()
        elif kind in (MsgType.RUN, MsgType.UPDATE, MsgType.STOP):
            if self.pending is None:
                self.pending = self.pool.submit(self._job, received, arrived)
            elif len(self.deferred) < MAX_DEFERRED:
                self.deferred.append((received, arrived))
            else:  # far behind the PS: skip the backlog and take the whole state again
                log.warning("%d messages from the PS waiting: asking for the state again", len(self.deferred))
                self.deferred.clear()
                self.out_of_sync = True

    def _job_done(self, gradient: Gradient | None) -> None:
        self.pending = None
        if self.out_of_sync:
            self.out_of_sync = False
            self._register()
        if self.received is not None:
            self._observe("atomo_worker_received_bytes_total", self.received, counter=True)
            self.received = None
        if gradient is not None:
            self._send_gradient(gradient)
        if self.deferred:
            self.pending = self.pool.submit(self._job, *self.deferred.pop(0))

    # -- jobs of the compute thread: apply what the PS sent, then compute the next gradient -----------------

    def _job(self, received, arrived: float) -> Gradient | None:
        header = received.header
        try:
            if header.type == MsgType.STOP:
                log.info("run %s over: %s", header.run_id, header.meta.get("reason"))
                self.run, self.step = None, -1
                return None
            if header.type == MsgType.RUN:
                compute = self._on_run(header, received.frames)
            else:
                compute = self._on_update(header, received.frames, arrived)
                self.received = received.nbytes
            return self._compute(self.run, self.step) if compute else None
        except Exception as exc:  # nothing the PS sends may kill the worker: ask for the whole state again
            log.warning("could not apply %s from the PS (%s): asking for the state again", header.type.name, exc)
            self.step = -1
            self.out_of_sync = True
            return None

    def _on_run(self, header: Header, frames) -> bool:
        meta = header.meta
        spec = RunSpec.model_validate(meta["spec"])
        shard, num_shards = int(meta["shard"]), int(meta["num_shards"])
        if self.run is None or self.run.run_id != header.run_id or self.run.shard != shard:
            self.run = self._assign(header.run_id, spec, shard, num_shards)
        self.run.replica.load_state_messages(frames, bool(meta.get("has_momentum")))
        self.step = header.step
        self.sent_at = 0.0
        self.communication_s = None
        log.info("run %s: state of step %d received (shard %d of %d)", header.run_id, header.step, shard, num_shards)
        if meta.get("check"):
            self.digest = (self.step, self.run.replica.digest())
        return bool(meta.get("compute"))

    def _assign(self, run_id: str, spec: RunSpec, shard: int, num_shards: int) -> Assignment:
        if spec.dataset not in self.datasets:
            self.datasets = {spec.dataset: load_dataset(spec.dataset, self.data_root, seed=spec.seed)}
        train, _test, info = self.datasets[spec.dataset]
        try:
            device = run_device(spec.device, self.device)
        except RuntimeError as exc:  # the PS has the device this worker lacks: train here all the same
            log.warning("run %s: %s; this worker trains on %s", run_id, exc, self.device)
            device = self.device
        replica = Replica(spec, info.num_classes, info.in_channels, device)
        stream = BatchStream(
            train.to(device), shard, num_shards, spec.batch_size // spec.workers, spec.seed, augment=info.augment
        )
        return Assignment(run_id, spec, shard, num_shards, replica, stream, gradient_policy(spec))

    def _on_update(self, header: Header, frames, arrived: float) -> bool:
        run = self.run
        if run is None or header.run_id != run.run_id or header.step <= self.step:
            return False  # another run's, or a duplicate
        meta = header.meta
        if meta["mode"] == "atoms":
            if header.step != self.step + 1:
                raise GradientError("gap", f"update {header.step} does not follow step {self.step}")
            n = run.replica.num_frames
            k = int(meta["k"])
            if len(frames) != k * n:
                raise GradientError("bad_frames", f"{len(frames)} frames for {k} gradients of {n}")
            run.replica.sgd_step([frames[i * n : (i + 1) * n] for i in range(k)], float(meta["lr"]))
        else:
            run.replica.load_state_messages(frames, False)
        self.step = header.step
        if self.sent_at:
            self.communication_s = max(0.0, arrived - self.sent_at - header.timings.get("ps_s", 0.0))
            self.sent_at = 0.0
        if meta.get("check"):
            self.digest = (self.step, run.replica.digest())
        return bool(meta.get("compute"))

    def _compute(self, run: Assignment, step: int) -> Gradient:
        """Forward and backward on this worker's batch of `step`, then encode."""
        start = time.perf_counter()
        replica = run.replica
        replica.model.train()
        replica.model.zero_grad(set_to_none=True)
        x, y = run.stream.batch(step)
        loss = F.cross_entropy(replica.model(x), y)
        loss.backward()
        loss_value = float(loss.detach())
        encode_start = time.perf_counter()
        try:
            frames = encode_gradient(run, step, step_generator(run.spec.seed, run.shard, step))
        except (RuntimeError, ValueError) as exc:  # e.g. a factorisation that did not converge
            log.warning("step %d: encoding failed (%s): this gradient goes dense", step, exc)
            frames = encode_gradient(run, step, None, dense=True)
        done = time.perf_counter()
        return Gradient(step, frames, loss_value, encode_start - start, done - encode_start)

    def _send_gradient(self, gradient: Gradient) -> None:
        run = self.run
        if run is None:
            return
        timings = {"compute_s": gradient.compute_s, "encode_s": gradient.encode_s}
        if self.communication_s is not None:
            timings["communication_s"] = self.communication_s
            self._observe("atomo_worker_communication_seconds", self.communication_s)
            self.communication_s = None
        # None: diverged (not finite, or beyond what the protocol accepts); the PS fails the run
        meta = {"loss": gradient.loss if math.isfinite(gradient.loss) and 0 <= gradient.loss <= MAX_LOSS else None}
        if self.digest is not None:
            meta["digest_step"], meta["digest"] = self.digest
            self.digest = None
        header = Header(MsgType.GRADIENT, run.run_id, gradient.step, self.worker_id, timings=timings, meta=meta)
        self.sent_at = time.monotonic()
        sent = self._send(header, gradient.frames)
        self._observe("atomo_worker_compute_seconds", gradient.compute_s)
        self._observe("atomo_worker_encode_seconds", gradient.encode_s)
        self._observe("atomo_worker_sent_bytes_total", sent, counter=True)

    def _observe(self, name: str, value: float, counter: bool = False) -> None:
        if self.metrics is None or self.run is None:
            return
        metric = self.metrics[name].labels(self.run.run_id, self.run.spec.codec.name, self.worker_id)
        if counter:
            metric.inc(value)
        else:
            metric.observe(value)


def install_signal_handlers(worker: Worker) -> None:
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
