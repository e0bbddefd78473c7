"""Server/Client over real ZeroMQ sockets on loopback: framing, limits, malformed peers, CURVE."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from helpers import wait_until

from atomo_core.codecs import make_codec
from atomo_core.wire import decode_message
from services.common.keys import write_keys
from services.common.protocol import Header, MsgType, pack_header
from services.common.transport import (
    MIN_BANDWIDTH,
    CurveKeys,
    MalformedMessage,
    QueueFull,
    SocketOptions,
    bind_server,
    connect_client,
)

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = SocketOptions(max_message_bytes=16 << 20, heartbeat_ivl_ms=200, linger_ms=0)
WAIT_MS = 5000


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def server(ctx):
    srv = bind_server(ctx, "127.0.0.1", 0, OPTIONS)
    yield srv
    srv.close()


def raw_dealer(ctx, server, identity: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    return sock


def test_exchange_zero_copy_frames_both_ways(ctx, server):
    assert server.port > 0 and server.endpoint == f"tcp://127.0.0.1:{server.port}"
    client = connect_client(ctx, server.endpoint, "w0", OPTIONS)
    payload = np.random.default_rng(0).standard_normal(10_000_000 // 8)  # a 10 MB frame
    header = Header(MsgType.GRADIENT, "run1", 5, "w0", {"compute_s": 0.5}, {"loss": 2.0})
    sent = client.send(header, [payload, b"tail"])
    got = server.recv(WAIT_MS)
    assert got.peer == b"w0" and got.header == header
    assert np.array_equal(np.frombuffer(got.frames[0], dtype=np.float64), payload)
    assert bytes(got.frames[1]) == b"tail"
    assert got.nbytes == sent == len(pack_header(header)) + payload.nbytes + 4
    assert all(frame.readonly for frame in got.frames)

    reply = Header(MsgType.UPDATE, "run1", 5, meta={"mode": "atoms", "k": 1, "lr": 0.1})
    tensor = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    assert server.send(got.peer, reply, [tensor, memoryview(b"abc")]) > 0
    back = client.recv(WAIT_MS)
    assert back.peer == b"" and back.header == reply
    assert torch.equal(torch.frombuffer(bytearray(back.frames[0]), dtype=torch.bfloat16).reshape(2, 3), tensor)
    assert bytes(back.frames[1]) == b"abc"
    client.close()


def test_atomo_messages_travel_as_one_frame_each(ctx, server):
    client = connect_client(ctx, server.endpoint, "w1", OPTIONS)
    codec = make_codec("dense")
    gradient = torch.randn(3, 4)
    message = codec.encode(gradient)
    client.send(Header(MsgType.GRADIENT, step=1), [message, message])
    got = server.recv(WAIT_MS)
    assert len(got.frames) == 2
    assert torch.equal(codec.decode(decode_message(got.frames[1])), gradient)
    client.close()


def test_peers_are_told_apart_by_identity(ctx, server):
    clients = {name: connect_client(ctx, server.endpoint, name, OPTIONS) for name in ("w0", "w1", "w2")}
    for name, client in clients.items():
        client.send(Header(MsgType.REGISTER, worker_id=name))
    peers = {}
    for _ in clients:
        got = server.recv(WAIT_MS)
        peers[got.peer] = got.header.worker_id
    assert peers == {b"w0": "w0", b"w1": "w1", b"w2": "w2"}
    for name in clients:
        server.send(name.encode(), Header(MsgType.HEARTBEAT, worker_id=name))
    for name, client in clients.items():
        assert client.recv(WAIT_MS).header.worker_id == name
        client.close()


def test_recv_timeout_returns_none(ctx, server):
    client = connect_client(ctx, server.endpoint, "w0", OPTIONS)
    start = time.monotonic()
    assert server.recv(200) is None
    assert client.recv(0) is None
    assert time.monotonic() - start >= 0.19
    client.close()


def test_send_to_an_unknown_peer_returns_zero(server):
    assert server.send(b"nobody", Header(MsgType.STOP, meta={"reason": "x"})) == 0


def test_oversized_frame_is_dropped_and_the_server_keeps_serving(ctx):
    """libzmq disconnects a peer whose frame exceeds MAXMSGSIZE: the server sees nothing of that message,
    the sender's DEALER reconnects by itself, and every other peer is unaffected."""
    small = SocketOptions(max_message_bytes=1 << 20, linger_ms=0)
    server = bind_server(ctx, "127.0.0.1", 0, small)
    big = connect_client(ctx, server.endpoint, "big", SocketOptions(max_message_bytes=8 << 20, linger_ms=0))
    other = connect_client(ctx, server.endpoint, "other", small)
    big.send(Header(MsgType.REGISTER))
    assert server.recv(WAIT_MS).peer == b"big"
    big.send(Header(MsgType.GRADIENT), [np.zeros(2 << 20, dtype=np.uint8)])
    assert server.recv(500) is None
    other.send(Header(MsgType.GRADIENT), [np.ones(1 << 19, dtype=np.uint8)])
    got = server.recv(WAIT_MS)
    assert got.peer == b"other" and len(got.frames[0]) == 1 << 19
    big.send(Header(MsgType.HEARTBEAT))  # after its automatic reconnection
    got = server.recv(WAIT_MS)
    assert got.peer == b"big" and got.header.type == MsgType.HEARTBEAT
    for endpoint in (big, other, server):
        endpoint.close()


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([b"garbage"], "bad_header"),
        ([pack_header(Header(MsgType.GRADIENT, "r", 1))[:9]], "bad_header"),
        ([b"ATHD\x01\x63{}"], "unknown_type"),
        ([b"ATHD\x09\x04{}"], "bad_version"),
        ([b""], "bad_header"),
        ([pack_header(Header(MsgType.GRADIENT))] + [b"x"] * 9, "too_many_frames"),
    ],
)
def test_malformed_messages_name_their_sender_and_the_next_one_is_fine(ctx, parts, reason):
    server = bind_server(ctx, "127.0.0.1", 0, SocketOptions(max_message_bytes=1 << 20, max_frames=8, linger_ms=0))
    bad = raw_dealer(ctx, server, b"mallory")
    bad.send_multipart(parts)
    with pytest.raises(MalformedMessage) as info:
        server.recv(WAIT_MS)
    assert info.value.peer == b"mallory" and info.value.reason == reason
    good = connect_client(ctx, server.endpoint, "alice", server._options)
    good.send(Header(MsgType.GRADIENT, step=2), [b"y"] * 8)
    got = server.recv(WAIT_MS)
    assert got.peer == b"alice" and got.header.step == 2 and len(got.frames) == 8
    bad.close()
    good.close()
    server.close()


def test_client_raises_malformed_for_a_bad_server_message(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = connect_client(ctx, f"tcp://127.0.0.1:{port}", "w0", OPTIONS)
    client.send(Header(MsgType.REGISTER))
    peer, _ = router.recv_multipart()
    router.send_multipart([peer, b"ATHD\x01\x02not json"])
    with pytest.raises(MalformedMessage) as info:
        client.recv(WAIT_MS)
    assert info.value.peer == b"" and info.value.reason == "bad_header"
    client.close()
    router.close()


def test_bind_refuses_a_remote_host_without_keys(ctx):
    for host in ("0.0.0.0", "10.1.2.3", "*", "example.org"):
        with pytest.raises(ValueError, match="CURVE keys"):
            bind_server(ctx, host, 0, OPTIONS)
    server = bind_server(ctx, "0.0.0.0", 0, OPTIONS, allow_remote_without_keys=True)
    client = connect_client(ctx, f"tcp://127.0.0.1:{server.port}", "w0", OPTIONS)
    client.send(Header(MsgType.HEARTBEAT))
    assert server.recv(WAIT_MS).peer == b"w0"
    client.close()
    server.close()


def test_heartbeats_drop_a_frozen_peer(ctx, server):
    """A worker process that stops answering (SIGSTOP) is disconnected by the server once the TTL its last PING
    announced (3 heartbeat intervals) has passed: the server sends no PINGs of its own."""
    code = textwrap.dedent(f"""
        import sys, zmq
        from services.common.protocol import Header, MsgType
        from services.common.transport import SocketOptions, connect_client
        options = SocketOptions(1 << 20, heartbeat_ivl_ms=200)
        client = connect_client(zmq.Context(), "{server.endpoint}", "frozen", options)
        client.send(Header(MsgType.REGISTER))
        client.recv(None)
        print("ready", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.recv(60_000).peer == b"frozen"
        assert server.send(b"frozen", Header(MsgType.HEARTBEAT)) > 0
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(0.5)  # past its first PING, which carries the TTL
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while server.send(b"frozen", Header(MsgType.HEARTBEAT)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.send(b"frozen", Header(MsgType.HEARTBEAT)) == 0
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_heartbeat_timeout_outlasts_the_largest_frame(ctx):
    """libzmq resets its heartbeat timer only per whole frame: with TIMEOUT = 3 x 5 ms a 45 MB frame would be
    cut off and lost; the default timeout covers max_message_bytes at MIN_BANDWIDTH."""
    options = SocketOptions(max_message_bytes=64 << 20, heartbeat_ivl_ms=5, linger_ms=0)
    assert options.heartbeat_timeout == -(-(64 << 20) * 1000 // MIN_BANDWIDTH)
    assert SocketOptions(max_message_bytes=1 << 20, heartbeat_ivl_ms=1000).heartbeat_timeout == 3000
    server = bind_server(ctx, "127.0.0.1", 0, options)
    client = connect_client(ctx, server.endpoint, "w0", options)
    client.send(Header(MsgType.GRADIENT), [np.ones(45_000_000, dtype=np.uint8)])
    got = server.recv(WAIT_MS)
    assert got is not None and len(got.frames[0]) == 45_000_000
    client.close()
    server.close()


@pytest.fixture(scope="module")
def key_dirs(tmp_path_factory):
    """Two independent key sets: one written by the real `atomo keys` command, one by its function."""
    directory, other = tmp_path_factory.mktemp("keys"), tmp_path_factory.mktemp("other")
    done = subprocess.run(
        [sys.executable, "-m", "services", "keys", str(directory), "--clients", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (directory / "clients" / "client-1.key_secret").stat().st_mode & 0o077 == 0
    write_keys(other, clients=2)
    return directory, other


def test_keys_are_never_overwritten(key_dirs):
    before = (key_dirs[0] / "server.key_secret").read_bytes()
    with pytest.raises(FileExistsError, match="already exist"):
        write_keys(key_dirs[0], clients=3)
    assert (key_dirs[0] / "server.key_secret").read_bytes() == before
    assert not (key_dirs[0] / "clients" / "client-2.key").exists()


def test_curve_authorized_clients_talk(ctx, key_dirs):
    server = bind_server(ctx, "0.0.0.0", 0, OPTIONS, keys=CurveKeys.load(key_dirs[0], "server"))
    endpoint = f"tcp://127.0.0.1:{server.port}"
    clients = [
        connect_client(ctx, endpoint, f"w{i}", OPTIONS, keys=CurveKeys.load(key_dirs[0], "client", f"client-{i}"))
        for i in range(2)
    ]
    for client in clients:
        client.send(Header(MsgType.REGISTER), [np.arange(1000)])
    got = [server.recv(WAIT_MS) for _ in clients]
    assert sorted(g.peer for g in got) == [b"w0", b"w1"]
    assert all(np.array_equal(np.frombuffer(g.frames[0], dtype=np.int64), np.arange(1000)) for g in got)
    server.send(b"w1", Header(MsgType.STOP, meta={"reason": "done"}))
    assert clients[1].recv(WAIT_MS).header.meta == {"reason": "done"}
    for client in clients:
        client.close()
    server.close()


def test_curve_rejects_unknown_keys_and_plain_clients(ctx, key_dirs):
    server = bind_server(ctx, "127.0.0.1", 0, OPTIONS, keys=CurveKeys.load(key_dirs[0], "server"))
    stranger = CurveKeys.load(key_dirs[1], "client", "client-0")
    impostor = CurveKeys(
        stranger.public, stranger.secret, CurveKeys.load(key_dirs[0], "client", "client-0").server_public
    )
    intruders = [
        connect_client(ctx, server.endpoint, "impostor", OPTIONS, keys=impostor),  # right server, unknown key
        connect_client(ctx, server.endpoint, "stranger", OPTIONS, keys=stranger),  # another server's key
        connect_client(ctx, server.endpoint, "plain", OPTIONS),  # no CURVE at all
    ]
    for client in intruders:
        client.send(Header(MsgType.REGISTER), [b"let me in"])
    assert server.recv(1500) is None
    assert server.send(b"impostor", Header(MsgType.HEARTBEAT)) == 0
    for client in intruders:
        assert client.recv(0) is None
        client.close()
    server.close()


def test_curve_key_loading_errors(tmp_path, key_dirs):
    with pytest.raises(ValueError, match="atomo keys"):
        CurveKeys.load(tmp_path, "server")
    with pytest.raises(ValueError, match="pick a client key"):
        CurveKeys.load(key_dirs[0], "client")
    with pytest.raises(ValueError, match="role"):
        CurveKeys.load(key_dirs[0], "observer")
    keys = CurveKeys.load(key_dirs[0], "server")
    assert len(keys.authorized) == 2 and keys.public == keys.server_public


def test_a_client_needs_only_its_pair_and_the_servers_public_key(tmp_path, key_dirs):
    """What a worker or the control service is given (the chart mounts exactly this): no server secret."""
    (tmp_path / "clients").mkdir()
    shutil.copy(key_dirs[0] / "server.key", tmp_path / "server.key")
    for suffix in (".key", ".key_secret"):
        shutil.copy(key_dirs[0] / "clients" / f"client-0{suffix}", tmp_path / "clients" / f"client-0{suffix}")
    full = CurveKeys.load(key_dirs[0], "client", "client-0")
    alone = CurveKeys.load(tmp_path, "client", "client-0")
    assert (alone.public, alone.secret, alone.server_public) == (full.public, full.secret, full.server_public)
    (tmp_path / "server.key").unlink()
    with pytest.raises(ValueError, match="server.key"):
        CurveKeys.load(tmp_path, "client", "client-0")


def test_socket_options_are_bounded():
    with pytest.raises(ValueError, match="header frame"):
        SocketOptions(max_message_bytes=1000)
    with pytest.raises(ValueError, match="linger_ms"):
        SocketOptions(max_message_bytes=1 << 20, linger_ms=-1)
    with pytest.raises(ValueError, match="max_frames"):
        SocketOptions(max_message_bytes=1 << 20, max_frames=0)


def _sent_or_zero(server, peer: bytes, header: Header) -> int:
    try:
        return server.send(peer, header)
    except QueueFull:
        return 0


def test_send_to_a_peer_that_does_not_read_fails_at_once(ctx):
    """Sends never block: once a peer's queue is full, send raises QueueFull; nothing queued before is lost."""
    options = SocketOptions(max_message_bytes=4 << 20, send_hwm=2, recv_hwm=2, linger_ms=0)
    server = bind_server(ctx, "127.0.0.1", 0, options)
    client = connect_client(ctx, server.endpoint, "slow", options)
    client.send(Header(MsgType.REGISTER))
    peer = server.recv(WAIT_MS).peer
    block = np.zeros(1 << 20, dtype=np.uint8)
    sends = 0
    with pytest.raises(QueueFull, match="queue is full"):
        while sends < 200:  # queues and socket buffers hold a few MiB at most
            server.send(peer, Header(MsgType.STOP, step=sends), [block])
            sends += 1
    assert 2 <= sends < 200
    for step in range(sends):  # nothing was lost or reordered before the queue filled
        assert client.recv(WAIT_MS).header.step == step
    # Read: room again, once libzmq's I/O thread has told the ROUTER's pipe (asynchronously, so not at once).
    assert wait_until(lambda: _sent_or_zero(server, peer, Header(MsgType.HEARTBEAT)), 5, "room in the queue") > 0
    client.close()
    server.close()


def test_a_client_without_a_connection_fails_at_once(ctx):
    """With `immediate`, a worker whose PS is away gets QueueFull instead of queuing (or blocking)."""
    options = SocketOptions(max_message_bytes=1 << 20, linger_ms=0, immediate=True)
    with zmq.Context() as probe:  # a port nobody listens on
        sock = probe.socket(zmq.ROUTER)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.close(linger=0)
    client = connect_client(ctx, f"tcp://127.0.0.1:{port}", "alone", options)
    with pytest.raises(QueueFull):
        client.send(Header(MsgType.REGISTER))
    client.close()


def test_a_message_over_the_byte_budget_is_released_and_counted(ctx):
    """The budget holds for the whole message, not only per frame: frames within MAXMSGSIZE and within the
    frame limit that add up to more are refused; the same peer's next message goes through."""
    options = SocketOptions(max_message_bytes=1 << 20, max_frames=8, max_total_bytes=3 << 20, linger_ms=0)
    assert SocketOptions(max_message_bytes=1 << 20, max_frames=8).total_budget == 9 << 20
    server = bind_server(ctx, "127.0.0.1", 0, options)
    client = connect_client(ctx, server.endpoint, "greedy", options)
    frame = np.zeros((1 << 20) - 1, dtype=np.uint8)
    client.send(Header(MsgType.GRADIENT), [frame] * 4)  # 4 MiB in 4 legal frames
    with pytest.raises(MalformedMessage) as info:
        server.recv(WAIT_MS)
    assert info.value.reason == "oversized" and info.value.peer == b"greedy"
    client.send(Header(MsgType.GRADIENT), [frame] * 2)
    got = server.recv(WAIT_MS)
    assert len(got.frames) == 2 and got.nbytes < 3 << 20
    with pytest.raises(ValueError, match="max_total_bytes"):
        SocketOptions(max_message_bytes=1 << 20, max_total_bytes=10)
    client.close()
    server.close()


def test_curve_messages_carry_the_senders_public_key(ctx, key_dirs):
    """On a CURVE server, Received.user_id is the z85 public key that authenticated the sender (the ZAP
    User-Id), so the PS can bind a worker id to it; a plain server has none."""
    server = bind_server(ctx, "127.0.0.1", 0, OPTIONS, keys=CurveKeys.load(key_dirs[0], "server"))
    keys = [CurveKeys.load(key_dirs[0], "client", f"client-{i}") for i in range(2)]
    clients = [connect_client(ctx, server.endpoint, f"w{i}", OPTIONS, keys=k) for i, k in enumerate(keys)]
    for client in clients:
        client.send(Header(MsgType.HEARTBEAT))
    got = {g.peer: g.user_id for g in (server.recv(WAIT_MS) for _ in clients)}
    assert got == {b"w0": keys[0].public.decode(), b"w1": keys[1].public.decode()}
    plain = bind_server(ctx, "127.0.0.1", 0, OPTIONS)
    client = connect_client(ctx, plain.endpoint, "w9", OPTIONS)
    client.send(Header(MsgType.HEARTBEAT))
    assert plain.recv(WAIT_MS).user_id is None
    for c in [*clients, client]:
        c.close()
    server.close()
    plain.close()


def test_ipv6_loopback(ctx):
    try:
        server = bind_server(ctx, "::1", 0, OPTIONS)
    except zmq.ZMQError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert server.endpoint == f"tcp://[::1]:{server.port}"
    client = connect_client(ctx, server.endpoint, "w6", OPTIONS)
    client.send(Header(MsgType.HEARTBEAT))
    assert server.recv(WAIT_MS).peer == b"w6"
    client.close()
    server.close()
