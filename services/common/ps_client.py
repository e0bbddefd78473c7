"""A client of the PS control port (docs/architecture.md, "PS control protocol").

One fresh REQ socket per request, with a send and receive timeout and no linger: a PS that is down or
restarts costs one timeout and never leaves a REQ socket stuck in its send/receive lockstep.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import zmq

if TYPE_CHECKING:  # the transport module pulls in torch; only the keys' fields are used here
    from services.common.transport import CurveKeys

MAX_REPLY_BYTES = 1 << 30  # a checkpoint of the largest model with headroom; the PS is trusted but bounded


class PSUnavailable(Exception):
    """The PS did not answer in time (or the reply was not the protocol's)."""


class PSError(Exception):
    """The PS answered `ok: false`; the message is its `error`."""


class PSClient:
    """Requests to the PS at `endpoint` (e.g. "tcp://127.0.0.1:5556"); thread-safe (no shared socket)."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0, curve: CurveKeys | None = None):
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.curve = curve
        self._context = zmq.Context.instance()

    def request(self, message: dict, timeout_s: float | None = None) -> list[bytes]:
        """Send one JSON request; return the reply frames. Raises PSUnavailable or PSError."""
        timeout_ms = self.timeout_ms if timeout_s is None else int(timeout_s * 1000)
        sock = self._context.socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
            sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
            if self.curve is not None:
                sock.curve_serverkey = self.curve.server_public
                sock.curve_publickey = self.curve.public
                sock.curve_secretkey = self.curve.secret
            sock.connect(self.endpoint)
            sock.send(json.dumps(message).encode())
            frames = sock.recv_multipart()
        except zmq.Again as exc:
            raise PSUnavailable(f"no reply from the PS at {self.endpoint} within {timeout_ms} ms") from exc
        finally:
            sock.close(linger=0)
        try:
            reply = json.loads(frames[0])
        except (ValueError, UnicodeDecodeError) as exc:
            raise PSUnavailable(f"the PS at {self.endpoint} sent a reply that is not JSON") from exc
        if not isinstance(reply, dict) or "ok" not in reply:
            raise PSUnavailable(f"the PS at {self.endpoint} sent a reply without 'ok'")
        if not reply["ok"]:
            raise PSError(str(reply.get("error", "unspecified error")))
        return [reply, *frames[1:]]

    def call(self, op: str, timeout_s: float | None = None, **fields) -> dict:
        return self.request({"op": op, **fields}, timeout_s)[0]

    def ping(self, timeout_s: float | None = None) -> dict:
        return self.call("ping", timeout_s)

    def status(self) -> dict:
        return self.call("status")

    def submit(self, run_id: str, spec: dict) -> None:
        self.call("submit", run_id=run_id, spec=spec)

    def cancel(self, run_id: str) -> None:
        self.call("cancel", run_id=run_id)

    def metrics(self, run_id: str, since: int) -> list[dict]:
        return self.call("metrics", run_id=run_id, since=since)["records"]

    def events(self, run_id: str, since: int) -> list[dict]:
        return self.call("events", run_id=run_id, since=since)["events"]

    def checkpoint(self, run_id: str, timeout_s: float = 30.0) -> tuple[int, bytes]:
        """(step, torch.save bytes) of the run's latest checkpoint."""
        frames = self.request({"op": "checkpoint", "run_id": run_id}, timeout_s)
        if len(frames) != 2:
            raise PSUnavailable("the PS's checkpoint reply is not two frames")
        return int(frames[0]["step"]), frames[1]
