"""Small helpers shared by the tests that drive real processes."""

from __future__ import annotations

import json
import time

import httpx
import zmq

from services.common.protocol import Header, MsgType
from services.common.replica import max_frame_bytes
from services.common.transport import MalformedMessage, SocketOptions, connect_client


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


def dropped_counts(cluster) -> dict[str, float]:
    """atomo_ps_dropped_messages_total by reason, scraped from a LocalCluster PS's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{cluster.ready['metrics_port']}/metrics", timeout=5).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("atomo_ps_dropped_messages_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def strict_json(text: str):
    """JSON as the standard defines it: NaN and Infinity refused."""

    def refuse(name):
        raise ValueError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


class FakeWorker:
    """A registered worker that heart-beats and reads what the PS sends, but never computes a gradient.

    `session`: the process token its REGISTER carries (two FakeWorkers with one id and two sessions are two
    processes of that worker; the second takes the first's connection over)."""

    def __init__(self, cluster, worker_id: str = "straggler", session: str | None = None):
        self.id = worker_id
        self.session = session
        self.heartbeat_s = cluster.heartbeat_s
        self.ctx = zmq.Context()
        options = SocketOptions(max_message_bytes=max_frame_bytes())
        self.client = connect_client(self.ctx, f"tcp://127.0.0.1:{cluster.port}", worker_id, options)
        self.received: list[Header] = []
        self.register()
        self.next_heartbeat = time.monotonic()

    def register(self) -> None:
        meta = {"device": "cpu", "pid": 0} | ({"session": self.session} if self.session is not None else {})
        self.client.send(Header(MsgType.REGISTER, worker_id=self.id, meta=meta))

    def serve_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                received = self.client.recv(50)
            except MalformedMessage as exc:
                raise AssertionError(f"the PS sent a malformed message: {exc}") from exc
            if received is not None:
                self.received.append(received.header)
            if time.monotonic() >= self.next_heartbeat:
                self.client.send(Header(MsgType.HEARTBEAT, worker_id=self.id))
                self.next_heartbeat = time.monotonic() + self.heartbeat_s / 2

    def wait_for(self, kind: MsgType, timeout_s: float) -> Header:
        """Serve until a message of type `kind` arrives after those received so far, and return its header."""
        seen = len(self.received)

        def arrived():
            self.serve_for(0.1)
            return next((h for h in self.received[seen:] if h.type == kind), None)

        return wait_until(arrived, timeout_s, f"a {kind.name} from the PS", 0)

    def close(self) -> None:
        self.client.close()
        self.ctx.term()
