"""The parameter server process: the workers' ROUTER socket, the control REP socket, heartbeats, one run.

Every incoming message is validated (header by the transport, then run id, step, sender, payload); a bad
one is dropped, logged with its sender and counted in atomo_ps_dropped_messages_total{reason}. Nothing a
peer sends can raise out of the loop.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import socket
import time
from pathlib import Path

import zmq

from services.common import metrics
from services.common.protocol import Header, MsgType, ProtocolError
from services.common.replica import max_frame_bytes, resolve_device
from services.common.spec import RunSpec
from services.common.transport import (
    ZAP_DOMAIN,
    CurveKeys,
    MalformedMessage,
    QueueFull,
    SocketOptions,
    bind_server,
)
from services.ps.rundir import RunDirectory, check_run_id, new_run_id, scan_runs
from services.ps.training import MAX_DECODE_TIMEOUT_S, STEP_TIMEOUT_S, Run, WorkerInfo, json_safe

log = logging.getLogger("atomo.ps")

POLL_MS = 10
MAX_CONTROL_BYTES = 1 << 20
MAX_RECORDS_PER_REPLY = 10_000
# What one message from a worker may occupy (the transport drops more; tests/test_ps_peers.py checks that
# every supported model fits): the largest gradient has 182 frames (resnet34: 110 parameters and 72
# floating-point BatchNorm buffers), and its dense fp32 bytes are 85.4 MB; a codec's message can exceed a
# layer's dense bytes (random atom counts, Elias codes), hence twice that: 176 MiB. A worker's connection
# queues at most WORKER_RCVHWM such messages (1.4 GiB) for the loop; a peer that breaks the limits is
# dropped once libzmq has its whole message (see services/common/transport.py on what that costs).
MAX_GRADIENT_FRAMES = 256
MAX_GRADIENT_BYTES = 176 << 20
WORKER_RCVHWM = 8  # messages queued per worker connection: a gradient and heartbeats
MAX_WORKERS = 1024  # registered worker ids
DROP_LOG_EVERY_S = 5.0  # at most one log line per drop reason in this time; every drop is counted


class ParameterServer:
    def __init__(
        self,
        bind: str = "127.0.0.1",
        port: int = 0,
        control_port: int = 0,
        state_dir: str | Path = "atomo-state",
        keys: CurveKeys | None = None,
        metrics_port: int | None = None,
        heartbeat_s: float = 1.0,
        check_every: int = 10,
        worker_timeout_s: float = 120.0,
        step_timeout_s: float = STEP_TIMEOUT_S,
        plugin_decode_timeout_s: float | None = None,
        device: str = "auto",
        data_root: str | None = None,
        allow_remote_without_keys: bool = False,
    ):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # new: private (run folders are)
        self.heartbeat_s = heartbeat_s
        self.check_every = check_every
        self.worker_timeout_s = worker_timeout_s
        self.step_timeout_s = step_timeout_s  # the least deadline of a step (Run.step_deadline_s)
        # A plugin codec's decode of one gradient holds the loop at most this long (Run.decoding); by default
        # less than the three heartbeat intervals after which a silent worker is declared lost.
        self.plugin_decode_timeout_s = plugin_decode_timeout_s or min(2 * heartbeat_s, MAX_DECODE_TIMEOUT_S)
        self.device = resolve_device(device)
        self.data_root = data_root
        self.ctx = zmq.Context()
        options = SocketOptions(
            max_message_bytes=max_frame_bytes(),
            recv_hwm=WORKER_RCVHWM,
            heartbeat_ivl_ms=int(heartbeat_s * 1000),
            max_frames=MAX_GRADIENT_FRAMES,
            max_total_bytes=MAX_GRADIENT_BYTES,
        )
        self.keys = keys
        self.worker_keys: dict[str, str] = {}  # with CURVE: worker id -> the public key that first registered it
        self.drop_log: dict[str, tuple[float, int]] = {}  # reason -> (time of its last log line, drops since)
        self.server = bind_server(self.ctx, bind, port, options, keys, allow_remote_without_keys)
        self.control = self._bind_control(bind, control_port, keys)
        self.address = f"{socket.gethostname()}:{self.server.port}"
        self.metrics = metrics.create(metrics.PS_METRICS)
        self.metrics_port = None
        if metrics_port is not None:
            from prometheus_client import start_http_server

            httpd, _thread = start_http_server(metrics_port, addr=bind)
            self.metrics_port = httpd.server_port
        self.workers: dict[str, WorkerInfo] = {}
        self.past_runs, unfinished = scan_runs(self.state_dir)
        self.run: Run | None = None
        self.exit_after: str | None = None
        self.stopping = False
        if unfinished:
            for run_id in unfinished[:-1]:
                self._abandon(run_id, "superseded by a newer run after a PS restart")
            self._resume(unfinished[-1])

    def _resume(self, run_id: str) -> None:
        """Resume the unfinished run `run_id` after a restart; one that cannot even be set up is failed."""
        try:
            self.start_run(run_id, RunSpec.model_validate(RunDirectory(self.state_dir, run_id).spec()))
        except Exception as exc:
            log.exception("run %s could not be resumed", run_id)
            self.run = None
            self._abandon(run_id, f"could not be resumed after a PS restart: {type(exc).__name__}: {exc}")

    def _bind_control(self, host: str, port: int, keys: CurveKeys | None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        if keys is not None:  # the workers' ZAP handler (same context) checks the clients' keys
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(f"tcp://[{host}]:{port or '*'}" if ":" in host else f"tcp://{host}:{port or '*'}")
        self.control_port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        return sock

    def _abandon(self, run_id: str, error: str) -> None:
        """An unfinished run that will not be resumed: record it as failed (in memory if its directory refuses)."""
        summary = {"run_id": run_id, "state": "failed", "error": error}
        self.past_runs[run_id] = summary
        try:
            RunDirectory(self.state_dir, run_id).write_summary(summary)
        except OSError:
            log.exception("run %s: summary.json not written", run_id)

    # -- metrics helpers used by the run ---------------------------------------------------------------------

    def observe(self, name: str, labels: tuple, value: float, counter: bool = False) -> None:
        metric = self.metrics[name].labels(*labels)
        metric.inc(value) if counter else metric.observe(value)

    def set_gauge(self, name: str, labels: tuple, value: float) -> None:
        self.metrics[name].labels(*labels).set(value)

    def drop(self, reason: str, sender: str, why: str) -> None:
        """Count a dropped message by reason; log it, at most one line per reason every DROP_LOG_EVERY_S (a
        flood of bad messages must not flood the log)."""
        self.metrics["atomo_ps_dropped_messages_total"].labels(reason).inc()
        now = time.monotonic()
        last, since = self.drop_log.get(reason, (-math.inf, 0))
        if now - last < DROP_LOG_EVERY_S:
            self.drop_log[reason] = (last, since + 1)
            return
        self.drop_log[reason] = (now, 0)
        more = f" ({since} more dropped for this reason since the last line)" if since else ""
        log.warning("dropped a message from %r (%s): %s%s", sender[:64], reason, why[:300], more)

    def send(self, w: WorkerInfo, header: Header, frames=()) -> int:
        """Send to a worker without blocking; returns the bytes sent (0: not sent). A worker whose queue is full
        does not read what it is sent: it is dropped (declared lost on the loop's next pass, which the run
        handles like any lost worker) and must register again."""
        try:
            return self.server.send(w.peer, header, frames)
        except QueueFull:
            self.drop("queue_full", w.id, f"{header.type.name} not sent: its queue is full")
            if w.state != "lost" and w.last_seen != -math.inf:
                log.warning("worker %s does not read what it is sent: dropped until it registers again", w.id)
                w.last_seen = -math.inf  # _detect_lost_workers declares it lost
            return 0
        except ProtocolError as exc:  # a header this PS built is out of the protocol's bounds: not sent
            log.error("%s to worker %s not sent: %s", header.type.name, w.id, exc)
            return 0

    def _reply(self, peer: bytes, header: Header) -> None:
        """A reply to a peer that is not (or no longer) a registered worker: never blocks, never raises."""
        try:
            self.server.send(peer, header)
        except QueueFull:
            self.drop("queue_full", peer.decode(errors="replace"), f"{header.type.name} not sent: its queue is full")

    # -- runs ------------------------------------------------------------------------------------------------

    def start_run(self, run_id: str, spec: RunSpec) -> Run:
        self.run = Run(self, run_id, spec, RunDirectory(self.state_dir, run_id), self.device)
        return self.run

    def submit(self, run_id: str | None, spec: RunSpec) -> str:
        if self.run is not None and not self.run.final:
            raise ValueError(f"run {self.run.run_id} is {self.run.state}: the PS serves one run at a time")
        run_id = check_run_id(run_id or new_run_id(spec.name))
        if run_id in self.past_runs or (self.run is not None and self.run.run_id == run_id):
            raise ValueError(f"run {run_id} exists")
        if self.run is not None:
            self.past_runs[self.run.run_id] = self.run.summary()
        self.start_run(run_id, spec)
        return run_id

    # -- the loop --------------------------------------------------------------------------------------------

    def serve(self) -> None:
        next_heartbeat = 0.0
        while not self.stopping:
            try:
                received = self.server.recv(POLL_MS)
            except MalformedMessage as exc:
                self.drop(exc.reason, exc.peer.decode(errors="replace")[:64], str(exc))
                received = None
            if received is not None:
                self._on_message(received)
            self._serve_control()
            now = time.monotonic()
            self._detect_lost_workers(now)  # every pass: a dead worker is declared lost 3 intervals after its last word
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_s
                self._heartbeats()
            if self.run is not None:
                self.run.tick(now)
                if self.exit_after == self.run.run_id and self.run.final:
                    break
        self.close()

    def close(self) -> None:
        if self.run is not None and self.run.prepared and not self.run.final:
            try:
                self.run.save_checkpoint()
                self.run.evaluator.close()
            except Exception:  # the run resumes from its previous checkpoint
                log.exception("run %s: checkpoint not written at shutdown", self.run.run_id)
        self.server.close()
        self.control.close(linger=0)
        self.ctx.term()

    def _detect_lost_workers(self, now: float) -> None:
        """A worker silent for three heartbeat intervals is lost, and so is one whose queue was full (send())."""
        for w in self.workers.values():
            if w.state != "lost" and now - w.last_seen > 3 * self.heartbeat_s:
                w.state = "lost"
                why = "its queue is full" if w.last_seen == -math.inf else f"silent for {now - w.last_seen:.1f} s"
                log.warning("worker %s lost (%s)", w.id, why)
                if self.run is not None and not self.run.final:
                    self.run.on_worker_lost(w)

    def _heartbeats(self) -> None:
        """Once per interval: a heartbeat to every live worker, and the live-worker gauge."""
        for w in self.workers.values():
            if w.state != "lost":
                self.send(w, Header(MsgType.HEARTBEAT, worker_id=w.id))
        self.metrics["atomo_ps_workers"].set(sum(w.state != "lost" for w in self.workers.values()))

    def _on_message(self, received) -> None:
        header = received.header
        sender = received.peer.decode(errors="replace")
        if header.worker_id != sender:
            self.drop("bad_sender", sender[:64], f"header names worker {header.worker_id!r}")
            return
        if header.type == MsgType.REGISTER:
            self._on_register(received)
            return
        if not self._key_matches(sender, received.user_id):
            return
        w = self.workers.get(sender)
        if w is None or w.state == "lost" or w.peer != received.peer:
            if header.type == MsgType.GRADIENT:
                self.drop("unregistered", sender, "gradient from a worker that is not registered")
            self._reply(received.peer, Header(MsgType.REJECT, worker_id=sender, meta={"reason": "unknown worker"}))
            return
        if w.last_seen != -math.inf:  # -inf: dropped for not reading (send()), lost on the loop's next pass
            w.last_seen = time.monotonic()
            w.last_heartbeat = time.time()
        if header.type == MsgType.GRADIENT:
            if self.run is None or self.run.final:
                self.drop("wrong_run", sender, f"gradient for run {header.run_id!r}, none is running")
            else:
                self.run.on_gradient(w, received)
        elif header.type != MsgType.HEARTBEAT:
            self.drop("unexpected_type", sender, f"{header.type.name} is not sent by workers")

    def _key_matches(self, worker_id: str, user_id: str | None) -> bool:
        """With CURVE, a worker id belongs to the public key that first registered it: a message under that
        id from another key is dropped (without keys there is nothing to check: see docs/architecture.md)."""
        if self.keys is None:
            return True
        bound = self.worker_keys.get(worker_id)
        if user_id is not None and bound in (None, user_id):
            return True
        self.drop("wrong_key", worker_id, f"worker id {worker_id!r} belongs to another client key")
        return False

    def _on_register(self, received) -> None:
        meta = received.header.meta  # checked against the REGISTER schema by protocol.unpack_header
        sender = received.header.worker_id
        if not sender or received.frames:
            self.drop("bad_meta", sender, "REGISTER needs a worker id and no payload")
            return
        if sender not in self.workers and len(self.workers) >= MAX_WORKERS:
            self.drop("too_many_workers", sender, f"{MAX_WORKERS} worker ids are registered already")
            return
        if not self._key_matches(sender, received.user_id):
            return
        if self.keys is not None:
            self.worker_keys[sender] = received.user_id
        w = self.workers.get(sender)
        if w is None:
            w = self.workers[sender] = WorkerInfo(sender, received.peer)
        elif (w.state == "lost" or meta.get("session") != w.session) and self.run is not None and not self.run.final:
            # back after its loss, or a new process under its id (a restart faster than the loss is detected:
            # it takes over its predecessor's shard, and no worker_lost comes)
            detail = {"worker": sender, "step": self.run.step, "was": w.state, "pid": meta.get("pid")}
            self.run.event("worker_rejoined", detail)
        w.peer = received.peer
        w.address = meta.get("address", "")
        w.device = meta.get("device", "")
        w.metrics_port = meta.get("metrics_port")
        w.pid = meta.get("pid")
        w.session = meta.get("session")
        w.last_seen = time.monotonic()
        w.last_heartbeat = time.time()
        if w.state == "lost":
            w.state = "idle"
        if self.run is not None and not self.run.final:
            self.run.on_worker_ready(w)
        if w.state != "training":
            self.send(w, Header(MsgType.HEARTBEAT, worker_id=sender))

    # -- control ---------------------------------------------------------------------------------------------

    def _serve_control(self) -> None:
        while self.control.poll(0, zmq.POLLIN):
            try:
                request = json.loads(self.control.recv())
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                frames = self._control(request)
            except Exception as exc:  # every request gets a reply: a REP socket must answer to go on
                frames = [{"ok": False, "error": str(exc)[:500] or type(exc).__name__}]
            try:
                head = json.dumps(frames[0], allow_nan=False, default=str).encode()
            except ValueError as exc:  # a REP socket that does not reply never receives again: say why instead
                log.exception("control reply to %r not serialisable", request)
                head, frames = json.dumps({"ok": False, "error": f"reply not serialisable: {exc}"}).encode(), [None]
            try:
                self.control.send_multipart([head, *frames[1:]])
            except zmq.ZMQError as exc:
                log.warning("control reply not sent: %s", exc)

    def _control(self, request: dict) -> list:
        op = request.get("op")
        run = self.run
        if op == "ping":
            return [{"ok": True, "ps": self.public()}]
        if op == "submit":
            spec = RunSpec.model_validate(request.get("spec") or {})
            run_id = self.submit(request.get("run_id"), spec)
            return [{"ok": True, "run_id": run_id}]
        if op == "cancel":
            run_id = request.get("run_id")
            if run is not None and run.run_id == run_id:
                run.cancel()
            return [{"ok": True}]
        if op == "status":
            runs = {rid: s.get("state") for rid, s in self.past_runs.items()}
            if run is not None:
                runs[run.run_id] = run.state
            return [
                {
                    "ok": True,
                    "ps": self.public(),
                    "workers": [w.public(run.run_id if run else None) for w in self.workers.values()],
                    "run": run.public() if run is not None else None,
                    "runs": runs,
                }
            ]
        if op == "metrics":
            since = _int_field(request, "since", -1)
            if self._is_current(request):
                records = run.metrics_since(since, MAX_RECORDS_PER_REPLY)
            else:
                newer = (r for r in self._past(request).metrics() if r["step"] > since)
                records = list(itertools.islice(newer, MAX_RECORDS_PER_REPLY))
            return [{"ok": True, "records": [json_safe(r) for r in records]}]
        if op == "events":
            since = _int_field(request, "since", 0)
            events = run.events if self._is_current(request) else self._past(request).events()
            return [{"ok": True, "events": [e for e in events if e["seq"] > since][:MAX_RECORDS_PER_REPLY]}]
        if op == "checkpoint":
            rundir = run.rundir if self._is_current(request) else self._past(request)
            if not rundir.checkpoint_path.exists():
                raise ValueError(f"run {rundir.run_id} has no checkpoint yet")
            data = rundir.checkpoint_path.read_bytes()
            step = run.checkpoint_step if self._is_current(request) else int(rundir.load_checkpoint()["step"])
            return [{"ok": True, "step": step}, data]
        raise ValueError(f"unknown op {op!r}")

    def _is_current(self, request: dict) -> bool:
        return self.run is not None and request.get("run_id") == self.run.run_id

    def _past(self, request: dict) -> RunDirectory:
        run_id = check_run_id(request.get("run_id"))
        if run_id not in self.past_runs:
            raise ValueError(f"unknown run {run_id}")
        return RunDirectory(self.state_dir, run_id)

    def public(self) -> dict:
        return {
            "address": self.address,
            "device": self.device.type,
            "state": "running" if self.run is not None and not self.run.final else "idle",
            "port": self.server.port,
            "control_port": self.control_port,
            "metrics_port": self.metrics_port,
        }


def _int_field(request: dict, key: str, default: int) -> int:
    value = request.get(key, default)
    if type(value) is not int:
        raise ValueError(f"{key} must be an integer")
    return value
