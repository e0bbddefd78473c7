"""ZeroMQ framing between the parameter server (ROUTER) and its workers (DEALER), optionally over CURVE.

A message is one header frame (`protocol.pack_header`) and payload frames; the ROUTER side adds the
peer's identity in front. Payload frames go out zero-copy (`copy=False`): a buffer passed to `send` must
not be modified until the peer has answered (ZeroMQ reads it from its I/O thread).

Bounds on what a peer can make us hold: ZeroMQ's MAXMSGSIZE bounds each frame (a peer that sends a
larger frame is disconnected by libzmq: the receiver sees nothing of that message, a ROUTER forgets the
peer's identity until it reconnects, and the sender's DEALER reconnects by itself); `recv` keeps at most
`max_frames` payload frames and `total_budget` bytes of a message, releases every frame past either limit
at once and raises `MalformedMessage` ("too_many_frames", "oversized"): nothing over the budget reaches
the application or stays in memory after `recv`. Before that, libzmq holds what it has queued: RCVHWM
counts whole messages (recv_hwm per connection, plus the one being read), and libzmq limits neither the
frames nor the bytes of one message, which it delivers only once all of it has arrived. So a peer that
breaks the limits costs memory until its message is complete and dropped (frames x MAXMSGSIZE, without
bound in the frame count): an authenticated (CURVE) peer is what bounds that on a network, hence
`bind_server` refuses a non-loopback host without keys, and on loopback without keys every local process
is trusted with it (docs/architecture.md, "Trust model"). Connection churn costs memory too: a bare pyzmq
ROUTER (no code of ours) whose peers connect, send a burst and disconnect every few milliseconds grew to
135 MiB resident in 10 s and 370-430 MiB in 20 s (libzmq 4.3.5), and kept it.

Heartbeats: the workers' DEALERs send ZeroMQ PINGs every `heartbeat_ivl_ms` (they reconnect to a restarted
PS by them) with a TTL that makes the PS's ROUTER drop a dead or frozen worker's connection;
`SocketOptions.heartbeat_timeout` says why the timeout grows with the frame size. The ROUTER sends no PINGs
of its own: with ZMQ_HEARTBEAT_IVL set on it, libzmq 4.3.5 (bundled with pyzmq 27.x, the latest release)
aborts the whole process with `Assertion failed: !_io_error (src/stream_engine_base.cpp:310)` when a peer
fills its receive queue (RCVHWM reached, so the engine stops reading) and then disconnects: the engine marks
the connection failed while it still drains the queue, and the next heartbeat timer calls its output
handler, which asserts. Reproduced on loopback with peers that send bursts of 300 messages and disconnect
with replies unread: an abort within 15-40 s with HEARTBEAT_IVL set on the ROUTER (ROUTER_HANDOVER makes it
come sooner), none in 70 s of the same traffic without it, nor with RCVHWM 0 (which would leave the queue
unbounded). libzmq's trackers have it as open issues 4364 (the same assertion with heartbeats) and 4841
(out_event asserting on `_io_error`); no released libzmq has a fix.

Sends never block: `send` uses ZMQ_DONTWAIT and raises `QueueFull` when the peer's queue (SNDHWM
messages) is full, so one peer that does not read cannot stall the PS's loop. `Server.send` to a peer
that is not connected returns 0 (ROUTER_MANDATORY turns the silent drop into an error that we report this
way). On a CURVE server, `Received.user_id` is the sender's public key (the ZAP User-Id), which the PS binds
to the worker id that registered with it. Sockets are not thread-safe: use each Server/Client from one thread.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq
from zmq.auth.thread import ThreadAuthenticator

from atomo_core.wire import Message
from services.common.protocol import MAX_HEADER_BYTES, Header, ProtocolError, check_name, pack_header, unpack_header

ZAP_DOMAIN = b"atomo"
MIN_BANDWIDTH = 10_000_000  # bytes/s a link is assumed to sustain when sizing the heartbeat timeout


@dataclass(frozen=True)
class SocketOptions:
    """Per-socket limits. `max_message_bytes` is ZeroMQ's MAXMSGSIZE, checked per frame: set it from the
    model size (the largest payload frame either side may send)."""

    max_message_bytes: int
    send_hwm: int = 8  # messages, not bytes
    recv_hwm: int = 64
    linger_ms: int = 1000  # bounded LINGER on close; never -1 (which can hang)
    heartbeat_ivl_ms: int = 1000  # ZMQ_HEARTBEAT_IVL
    heartbeat_timeout_ms: int | None = None  # ZMQ_HEARTBEAT_TIMEOUT and TTL; None: see `heartbeat_timeout`
    max_frames: int = 1024  # payload frames per multipart message accepted
    max_total_bytes: int | None = None  # bytes of one whole message accepted; None: max_frames + 1 full frames
    immediate: bool = False  # client: queue only on completed connections (sends fail while disconnected)

    def __post_init__(self):
        if self.max_message_bytes < MAX_HEADER_BYTES:
            raise ValueError(
                f"max_message_bytes must hold a header frame ({MAX_HEADER_BYTES}), got {self.max_message_bytes}"
            )
        for name in ("send_hwm", "recv_hwm", "heartbeat_ivl_ms", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heartbeat_timeout_ms is not None and self.heartbeat_timeout_ms < 1:
            raise ValueError(f"heartbeat_timeout_ms must be positive, got {self.heartbeat_timeout_ms}")
        if self.linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0 (a bounded linger), got {self.linger_ms}")
        if self.max_total_bytes is not None and self.max_total_bytes < MAX_HEADER_BYTES:
            raise ValueError(f"max_total_bytes must hold a header ({MAX_HEADER_BYTES}), got {self.max_total_bytes}")

    @property
    def total_budget(self) -> int:
        """Bytes one received multipart message may hold in all (header and payload frames)."""
        if self.max_total_bytes is not None:
            return self.max_total_bytes
        return (self.max_frames + 1) * self.max_message_bytes

    @property
    def heartbeat_timeout(self) -> int:
        """Milliseconds without a complete frame from a peer before libzmq drops the connection.

        libzmq resets this timer only when a whole frame has arrived (its PONG queues behind our frames),
        so a frame that takes longer than the timeout to arrive is cut off: the connection drops and the
        message is lost. The default is 3 x IVL, raised to the
        time `max_message_bytes` takes at MIN_BANDWIDTH (10 MB/s); set it higher on slower links.
        """
        if self.heartbeat_timeout_ms is not None:
            return self.heartbeat_timeout_ms
        return max(3 * self.heartbeat_ivl_ms, -(-self.max_message_bytes * 1000 // MIN_BANDWIDTH))


@dataclass
class Received:
    peer: bytes  # ROUTER side: the sender's identity; b"" on the DEALER side
    header: Header
    frames: list[memoryview]  # payload frames, zero-copy read-only views
    nbytes: int  # total bytes of the multipart message, header included (identity excluded)
    user_id: str | None = None  # CURVE server side: the z85 public key that authenticated the sender (ZAP User-Id)


class QueueFull(Exception):
    """A send found the peer's queue full (it does not read what it is sent), or, on a client with
    `immediate`, no connection to queue on. Nothing of the message was queued; sends never block."""


class MalformedMessage(ProtocolError):
    """Raised by `recv` for a bad multipart message, after all of it was consumed; `.peer` is the sender."""

    def __init__(self, reason: str, message: str, peer: bytes = b""):
        super().__init__(reason, message)
        self.peer = peer


class CurveKeys:
    """CURVE keys from a directory written by `atomo keys DIR` (see services/common/keys.py).

    Layout: `DIR/server.key` (public), `DIR/server.key_secret`, `DIR/clients/NAME.key` and
    `NAME.key_secret` per client. The server accepts exactly the public keys in `DIR/clients/`. A server
    reads its pair and the clients' public keys; a client reads only its own pair and `DIR/server.key`.
    """

    def __init__(self, public: bytes, secret: bytes, server_public: bytes, authorized: frozenset[bytes] = frozenset()):
        self.public = public
        self.secret = secret
        self.server_public = server_public
        self.authorized = authorized

    @classmethod
    def load(cls, directory, role: str, name: str | None = None) -> CurveKeys:
        directory = Path(directory)
        clients = directory / "clients"
        if role == "server":
            server_public, server_secret = _load_pair(directory / "server.key_secret")
            authorized = frozenset(_load_public(path) for path in sorted(clients.glob("*.key")))
            if not authorized:
                raise ValueError(f"no client public keys in {clients}: no client could connect")
            return cls(server_public, server_secret, server_public, authorized)
        if role != "client":
            raise ValueError(f"role must be 'server' or 'client', got {role!r}")
        if name is None:
            names = sorted(path.name.removesuffix(".key_secret") for path in clients.glob("*.key_secret"))
            if len(names) != 1:
                raise ValueError(f"pick a client key name among {names} in {clients}")
            name = names[0]
        public, secret = _load_pair(clients / f"{name}.key_secret")
        return cls(public, secret, _load_public(directory / "server.key"))  # a client never needs the server's secret

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check (zmq.auth): accept only the authorized client keys."""
        return key in self.authorized


def _load_pair(path: Path) -> tuple[bytes, bytes]:
    if not path.is_file():
        raise ValueError(f"missing CURVE key file {path} (write keys with `atomo keys DIR`)")
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def _load_public(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"missing CURVE key file {path} (write keys with `atomo keys DIR`)")
    public, _ = zmq.auth.load_certificate(path)
    return public


class _Authenticators:
    """One ZAP handler per context (ZeroMQ allows one), shared by the CURVE servers of that context."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_context: dict[zmq.Context, tuple[ThreadAuthenticator, list[CurveKeys]]] = {}

    def acquire(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        with self._lock:
            if ctx not in self._by_context:
                auth = ThreadAuthenticator(ctx)
                auth.start()
                self._by_context[ctx] = (auth, [])
            auth, users = self._by_context[ctx]
            users.append(keys)
            auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=_AnyOf(list(users)))

    def release(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        with self._lock:
            auth, users = self._by_context[ctx]
            users.remove(keys)
            if users:
                auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=_AnyOf(list(users)))
            else:
                auth.stop()
                del self._by_context[ctx]


class _AnyOf:
    def __init__(self, users: list[CurveKeys]):
        self.users = users

    def callback(self, domain: str, key: bytes) -> bool:
        return any(keys.callback(domain, key) for keys in self.users)


_AUTHENTICATORS = _Authenticators()


def _configure(sock: zmq.Socket, options: SocketOptions, pings: bool) -> None:
    """Limits, bounded linger, TCP keepalive, reconnection; ZMTP PINGs only where `pings` (the clients)."""
    sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, options.send_hwm)
    sock.setsockopt(zmq.RCVHWM, options.recv_hwm)
    sock.setsockopt(zmq.LINGER, options.linger_ms)
    if pings:  # the server sends none: see the module docstring (libzmq's `!_io_error` abort)
        sock.setsockopt(zmq.HEARTBEAT_IVL, options.heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, options.heartbeat_timeout)
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(options.heartbeat_timeout, 6553500))  # TTL's upper bound
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 6)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses: the only hosts served without keys or a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tcp(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def bind_server(
    ctx: zmq.Context,
    host: str,
    port: int,
    options: SocketOptions,
    keys: CurveKeys | None = None,
    allow_remote_without_keys: bool = False,
) -> Server:
    """A ROUTER bound to tcp://host:port (port 0 picks a free port); a CURVE server when `keys` are given."""
    if keys is None and not is_loopback(host) and not allow_remote_without_keys:
        raise ValueError(
            f"refusing to serve unauthenticated on non-loopback host {host!r}: give CURVE keys "
            "(`atomo keys DIR`) or allow_remote_without_keys=True on a trusted network"
        )
    sock = ctx.socket(zmq.ROUTER)
    try:
        _configure(sock, options, pings=False)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to an unknown or full peer fails instead of vanishing
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker takes its identity back at once
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        if keys is not None:
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
            _AUTHENTICATORS.acquire(ctx, keys)
        try:
            sock.bind(_tcp(host, port or "*"))
        except zmq.ZMQError:
            if keys is not None:
                _AUTHENTICATORS.release(ctx, keys)
            raise
    except BaseException:
        sock.close(linger=0)
        raise
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return Server(sock, options, endpoint, int(endpoint.rsplit(":", 1)[1]), ctx, keys)


def connect_client(
    ctx: zmq.Context, endpoint: str, identity: str, options: SocketOptions, keys: CurveKeys | None = None
) -> Client:
    """A DEALER with the stable identity `identity` (the worker id), connected to `endpoint`."""
    check_name(identity, "identity")
    if not identity:
        raise ValueError("a client identity must not be empty")
    sock = ctx.socket(zmq.DEALER)
    try:
        _configure(sock, options, pings=True)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.IMMEDIATE, int(options.immediate))
        if keys is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return Client(sock, options)


def _buffer(frame) -> memoryview | bytes | zmq.Frame:
    """A frame as something ZeroMQ sends without copying (an atomo_core Message is joined once)."""
    if isinstance(frame, Message):
        return bytes(frame)
    if isinstance(frame, zmq.Frame):
        return frame
    if isinstance(frame, torch.Tensor):
        if frame.device.type != "cpu":
            frame = frame.cpu()
        return memoryview(frame.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    view = memoryview(frame)
    if not view.c_contiguous:
        raise ValueError("payload frames must be C-contiguous buffers")
    return view


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of a received frame: the sender's z85 CURVE public key; None without authentication."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user_id or None


def _nbytes(buf) -> int:
    return len(buf) if isinstance(buf, (bytes, zmq.Frame)) else buf.nbytes


class _Endpoint:
    def __init__(self, sock: zmq.Socket, options: SocketOptions):
        self._sock = sock
        self._options = options

    def _send(self, prefix: list[bytes], header: Header, frames: Sequence) -> int:
        parts = [pack_header(header)] + [_buffer(f) for f in frames]
        try:
            self._sock.send_multipart(prefix + parts, flags=zmq.DONTWAIT, copy=False)
        except zmq.Again as exc:
            raise QueueFull(f"{header.type.name} not sent: the peer's queue is full or it is not connected") from exc
        return sum(_nbytes(p) for p in parts)

    def _recv(self, timeout_ms: int | None, router: bool) -> Received | None:
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            return None
        parts: list[zmq.Frame] = []
        keep = int(router) + 1 + self._options.max_frames  # identity, header, payload
        budget = self._options.total_budget
        count = total = 0
        more = True
        while more:  # consume the whole message (it has fully arrived) before judging it
            frame = self._sock.recv(zmq.NOBLOCK, copy=False)
            more = frame.more
            count += 1
            if count > int(router):
                total += len(frame)
            if count <= keep and total <= budget:  # past either limit, each frame is released at once
                parts.append(frame)
        peer = parts.pop(0).bytes if router else b""  # a ZeroMQ message has at least one frame after it
        if count > keep:
            payload = count - int(router) - 1
            raise MalformedMessage(
                "too_many_frames", f"{payload} payload frames exceed {self._options.max_frames}", peer
            )
        if total > budget:
            raise MalformedMessage("oversized", f"a message of {total} bytes exceeds the budget of {budget}", peer)
        try:
            header = unpack_header(parts[0].buffer)
        except ProtocolError as exc:
            raise MalformedMessage(exc.reason, str(exc), peer) from exc
        frames = [p.buffer.toreadonly() for p in parts[1:]]
        return Received(peer, header, frames, total, _user_id(parts[0]))

    def close(self) -> None:
        self._sock.close(linger=self._options.linger_ms)


class Server(_Endpoint):
    """The PS side: a ROUTER; peers are identified by their identity bytes."""

    def __init__(self, sock, options, endpoint: str, port: int, ctx: zmq.Context, keys: CurveKeys | None):
        super().__init__(sock, options)
        self.endpoint = endpoint
        self.port = port
        self._ctx = ctx
        self._keys = keys

    def send(self, peer: bytes, header: Header, frames: Sequence = ()) -> int:
        """Send to one peer without blocking; returns the bytes sent (header + payload), or 0 if that peer is
        not connected; raises QueueFull if its queue is full (it does not read)."""
        try:
            return self._send([peer], header, frames)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return 0
            raise

    def recv(self, timeout_ms: int | None) -> Received | None:
        """The next message (None after `timeout_ms`; None waits forever); raises MalformedMessage."""
        return self._recv(timeout_ms, router=True)

    def close(self) -> None:
        if self._sock.closed:
            return
        super().close()
        if self._keys is not None:
            _AUTHENTICATORS.release(self._ctx, self._keys)


class Client(_Endpoint):
    """The worker side: a DEALER with a stable identity; reconnects by itself."""

    def send(self, header: Header, frames: Sequence = ()) -> int:
        """Send to the server without blocking; returns the bytes sent (header + payload); raises QueueFull."""
        return self._send([], header, frames)

    def recv(self, timeout_ms: int | None) -> Received | None:
        """The next message (None after `timeout_ms`; None waits forever); raises MalformedMessage."""
        return self._recv(timeout_ms, router=False)
