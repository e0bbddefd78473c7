"""The PS against hostile peers on its worker port, as real processes: peers that never read, a message over
the byte budget (the PS's memory measured), CURVE keys bound to worker ids, the worker's hint about keys."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from helpers import FakeWorker, dropped_counts, wait_until

from atomo_core import dense_nbytes
from atomo_core.models import build_model
from services.common.keys import write_keys
from services.common.launch import LocalCluster, free_port
from services.common.protocol import MAGIC, MAX_HEADER_BYTES, PROTOCOL_VERSION, Header, MsgType, pack_header
from services.common.replica import FRAME_SLACK, MODELS, max_frame_bytes
from services.common.transport import CurveKeys, QueueFull, SocketOptions, connect_client
from services.ps.server import MAX_GRADIENT_BYTES, MAX_GRADIENT_FRAMES

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 120
MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("peers"), workers=1, threads=1)
    c.start()
    yield c
    c.stop()


def wait_for_drop(cluster, reason: str, before: dict, timeout_s: float = 30) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count = dropped_counts(cluster).get(reason, 0) - before.get(reason, 0)
        if count > 0:
            return count
        time.sleep(0.2)
    raise AssertionError(f"no message dropped for {reason!r} within {timeout_s} s")


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def raw_dealer(ctx, cluster, identity: bytes, **options) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(f"tcp://127.0.0.1:{cluster.port}")
    return sock


def prefix(kind: MsgType) -> bytes:
    """The 6 bytes before a header's JSON body (magic, version, type)."""
    return MAGIC + bytes([PROTOCOL_VERSION, kind])


def worker_process(tmp_path, port: int, heartbeat_s: float) -> tuple[subprocess.Popen, Path]:
    """A real worker process "w0" whose PS is whatever listens on `port` on loopback; (process, its log)."""
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services", "worker", "--ps", f"tcp://127.0.0.1:{port}", "--id", "w0"]
            + ["--heartbeat-s", str(heartbeat_s), "--threads", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return worker, log


def test_message_limits_fit_every_supported_model():
    """MAX_GRADIENT_FRAMES and MAX_GRADIENT_BYTES hold the largest legitimate gradient, with room to spare."""
    with torch.device("meta"):
        for name in MODELS:
            model = build_model(name, 100, 3)
            tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
            assert len(tensors) <= MAX_GRADIENT_FRAMES, name
            dense = sum(dense_nbytes(tuple(t.shape)) for t in tensors)
            assert 2 * dense + len(tensors) * FRAME_SLACK + MAX_HEADER_BYTES <= MAX_GRADIENT_BYTES, name


def test_peers_that_never_read_are_dropped_and_counted_while_the_run_goes_on(cluster):
    """A peer that sends fast and never reads its replies (each gets a REJECT), and peers that send a burst and
    disconnect with the replies unread: the PS's sends never block, the full queue is counted, the run ends
    well and the PS keeps answering its control port."""
    before = dropped_counts(cluster)
    spec = {"model": "mlp", "steps": 40, "eval_every": 40, "workers": 1}
    cluster.client().call("submit", run_id="hogged", spec=spec)
    ctx = zmq.Context()
    try:
        hog = raw_dealer(ctx, cluster, b"hog", RCVHWM=1, RCVBUF=4096, SNDHWM=100)
        beat = pack_header(Header(MsgType.HEARTBEAT, worker_id="hog"))
        full = 0.0
        deadline = time.monotonic() + 60
        while not full and time.monotonic() < deadline:
            for _ in range(5000):
                try:
                    hog.send(beat, zmq.DONTWAIT)
                except zmq.Again:
                    time.sleep(0.001)
            full = dropped_counts(cluster).get("queue_full", 0) - before.get("queue_full", 0)
        assert full > 0, "the hog's queue never filled"
        for round_ in range(10):  # bursts, then gone with the replies unread
            burst = raw_dealer(ctx, cluster, b"burst-%d" % (round_ % 2))
            for _ in range(300):
                burst.send(pack_header(Header(MsgType.HEARTBEAT, worker_id=f"burst-{round_ % 2}")))
            burst.close(linger=0)
        run = cluster.wait_for_run("hogged", RUN_TIMEOUT_S)
        hog.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    assert run["state"] == "succeeded" and run["step"] == 40, run
    assert cluster.client().ping()["ok"] and cluster.ps.poll() is None


def test_a_message_over_the_byte_budget_costs_no_lasting_memory(cluster):
    """Frames each within MAXMSGSIZE and within the frame limit, adding up to more than MAX_GRADIENT_BYTES:
    dropped as oversized. The PS's peak memory grows by at most that one message (libzmq holds it whole
    before delivering it; the PS copies nothing), and its resident memory comes back afterwards."""
    pid = cluster.ps.pid
    frame = bytes(max_frame_bytes() - 1)
    count = MAX_GRADIENT_BYTES // len(frame) + 2
    assert count <= MAX_GRADIENT_FRAMES
    total = count * len(frame)
    clear_refs = Path(f"/proc/{pid}/clear_refs")
    try:
        clear_refs.write_text("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        pytest.skip("cannot reset the PS's peak memory here")
    start = memory_kib(pid)
    before = dropped_counts(cluster)
    ctx = zmq.Context()
    try:
        greedy = raw_dealer(ctx, cluster, b"greedy")
        header = pack_header(Header(MsgType.GRADIENT, "x", 0, "greedy", meta={"loss": 1.0}))
        greedy.send_multipart([header, *[frame] * count], copy=False)
        wait_for_drop(cluster, "oversized", before, timeout_s=60)
        greedy.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    time.sleep(0.5)
    end = memory_kib(pid)
    peak_growth = (end["VmHWM"] - start["VmRSS"]) * 1024
    lasting = (end["VmRSS"] - start["VmRSS"]) * 1024
    assert peak_growth <= total + 64 * MiB, (peak_growth / MiB, total / MiB)
    assert lasting <= 64 * MiB, lasting / MiB
    assert cluster.client().ping()["ok"] and cluster.ps.poll() is None


def test_with_curve_a_worker_id_belongs_to_the_key_that_registered_it(tmp_path):
    """Two listed keys: client-1 cannot act as worker-0 (registered with client-0), though it may register under
    an id of its own; the run trains on. A worker without keys gets a hint about keys instead of silence."""
    keys = tmp_path / "keys"
    write_keys(keys, clients=2)
    with LocalCluster(tmp_path / "state", workers=1, threads=1, keys=keys) as cluster:
        before = dropped_counts(cluster)
        ctx = zmq.Context()
        options = SocketOptions(max_message_bytes=1 << 20, linger_ms=0)
        other_key = CurveKeys.load(keys, "client", "client-1")
        endpoint = f"tcp://127.0.0.1:{cluster.port}"
        try:
            impostor = connect_client(ctx, endpoint, "worker-0", options, keys=other_key)
            deadline = time.monotonic() + 10
            sent = False
            while not sent and time.monotonic() < deadline:
                try:
                    impostor.send(Header(MsgType.REGISTER, worker_id="worker-0", meta={"device": "cpu"}))
                    impostor.send(Header(MsgType.GRADIENT, "none", 0, "worker-0", meta={"loss": 1.0}))
                    sent = True
                except QueueFull:  # the CURVE handshake is not done yet
                    time.sleep(0.05)
            assert sent
            assert wait_for_drop(cluster, "wrong_key", before) >= 1
            impostor.close()
            honest = connect_client(ctx, endpoint, "client-1-own", options, keys=other_key)
            got = None
            deadline = time.monotonic() + 10
            while got is None and time.monotonic() < deadline:
                try:
                    honest.send(Header(MsgType.REGISTER, worker_id="client-1-own", meta={"device": "cpu"}))
                except QueueFull:
                    time.sleep(0.05)
                    continue
                got = honest.recv(1000)
            assert got is not None and got.header.type == MsgType.HEARTBEAT
            honest.close()
        finally:
            ctx.destroy(linger=0)
        cluster.client().call("submit", run_id="bound", spec={"model": "mlp", "steps": 20, "eval_every": 20})
        run = cluster.wait_for_run("bound", RUN_TIMEOUT_S)
        assert run["state"] == "succeeded", run
        log = tmp_path / "nokey.log"
        with open(log, "wb") as out:
            nokey = subprocess.Popen(
                [sys.executable, "-m", "services", "worker", "--ps", endpoint, "--id", "nokey"]
                + ["--heartbeat-s", "0.2", "--threads", "1"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            deadline = time.monotonic() + 60
            while "pass --keys DIR --key-name NAME" not in log.read_text() and time.monotonic() < deadline:
                assert nokey.poll() is None, log.read_text()
                time.sleep(0.2)
            assert "no answer from the PS at" in log.read_text()
        finally:
            nokey.kill()
            nokey.wait()
        workers = {w["id"] for w in cluster.client().status()["workers"]}
        assert "nokey" not in workers and "worker-0" in workers


def test_a_worker_skips_what_its_ps_sends_malformed_and_lives_on(tmp_path):
    """A real worker process against a raw ROUTER standing in for its PS: garbage, numbers out of range and a
    RUN whose spec does not validate are dropped or skipped (the worker asks for the state again), and the
    worker lives on."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker, log = worker_process(tmp_path, port, heartbeat_s=0.2)

    def next_of(kind: MsgType, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if router.poll(100):
                parts = router.recv_multipart()
                if parts[1][5] == kind:
                    return True
        return False

    try:
        assert router.poll(60_000) and router.recv_multipart()[0] == b"w0"
        body = '{"run_id":"r","step":1,"worker_id":"","timings":{},"meta":{"mode":"atoms","k":1,"lr":1e400}}'
        router.send_multipart([b"w0", b"garbage"])
        router.send_multipart([b"w0", prefix(MsgType.UPDATE) + body.encode()])
        stop = '{"run_id":"r","step":1,"worker_id":"","timings":{"ps_s":1e300},"meta":{"reason":"x"}}'
        router.send_multipart([b"w0", prefix(MsgType.STOP) + stop.encode()])
        bad_run = Header(MsgType.RUN, "r", 0, meta={"spec": {"model": "no-such-model"}, "shard": 0, "num_shards": 1})
        router.send_multipart([b"w0", pack_header(bad_run)])
        assert next_of(MsgType.REGISTER, 30), "the worker did not ask for the state again"
        assert next_of(MsgType.HEARTBEAT, 10) or next_of(MsgType.REGISTER, 10)
        assert worker.poll() is None, log.read_text()
        text = log.read_text()
        assert text.count("malformed message from the PS dropped") == 3, text
        assert "could not apply RUN from the PS" in text, text
    finally:
        worker.terminate()
        worker.wait(30)
        ctx.destroy(linger=0)


def test_a_worker_whose_first_register_found_no_ps_sends_nothing_before_registering(tmp_path):
    """A real worker process started before its PS listens (as a worker restarted by its supervisor can be,
    while the PS has not yet taken the new connection): its first REGISTER finds no peer and is dropped, and the
    first message the PS then gets from it is a REGISTER. A heartbeat first would pass for its dead predecessor's
    (same worker id), and that worker would never get the state it waits for."""
    port = free_port()
    worker, log = worker_process(tmp_path, port, heartbeat_s=2)  # heartbeats at 2 s and 4 s, before 6 s of silence
    ctx = zmq.Context()
    try:
        wait_until(lambda: '"ready": true' in log.read_text(), 60, "the worker's ready line", 0.05)
        time.sleep(0.5)  # its first REGISTER has gone nowhere
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"tcp://127.0.0.1:{port}")
        assert router.poll(30_000), log.read_text()
        identity, header = router.recv_multipart()[:2]
        assert identity == b"w0" and header.startswith(prefix(MsgType.REGISTER)), (header[:80], log.read_text())
    finally:
        worker.terminate()
        worker.wait(30)
        ctx.destroy(linger=0)


def test_a_new_process_under_a_training_workers_id_takes_over_its_shard_before_the_loss_is_found(tmp_path):
    """A worker restarted faster than the PS finds it lost (three heartbeat intervals): its new process's
    REGISTER (a new session; the pid may repeat, as in a container) gets the state at once and the event
    worker_rejoined (was "training"), with no worker_lost; a REGISTER again from the same process (one asking
    for the state again) is no rejoin."""
    cluster = LocalCluster(tmp_path, workers=0, threads=1, heartbeat_s=2.0)

    def events(kind: str) -> list[dict]:
        found = cluster.client().call("events", run_id="takeover", since=0)["events"]
        return [e for e in found if e["type"] == kind]

    try:
        cluster.start()
        first = FakeWorker(cluster, "w-x", session="first")  # both with pid 0
        cluster.client().call("submit", run_id="takeover", spec={"model": "mlp", "steps": 10_000, "workers": 1})
        assert first.wait_for(MsgType.RUN, 60).meta["shard"] == 0
        first.close()  # killed, mid-step
        second = FakeWorker(cluster, "w-x", session="second")
        try:
            assert second.wait_for(MsgType.RUN, 60).meta["shard"] == 0
            (rejoined,) = events("worker_rejoined")
            detail = rejoined["detail"]
            assert (detail["worker"], detail["was"], detail["pid"]) == ("w-x", "training", 0), detail
            second.register()
            second.wait_for(MsgType.RUN, 60)
        finally:
            second.close()
        assert len(events("worker_rejoined")) == 1 and not events("worker_lost")
        assert [e["detail"]["worker"] for e in events("worker_joined")] == ["w-x"]
    finally:
        cluster.stop()
