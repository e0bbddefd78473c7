"""Fuzzing the PS's worker port for a bounded time while a real worker trains.

A seeded mutator takes real messages (headers packed by the protocol module, gradients encoded by the run's
own codec policy for the run's model) and sends them mutated from several peers: bytes flipped, frames
truncated, added, dropped or repeated, numbers at the edges of JSON and floats, text that is not UTF-8 or
holds lone surrogates, values of the wrong type, peers that never read their replies, and bursts followed
by a disconnect. Afterwards the PS must be alive, answer its control port, have trained on, counted its
drops, kept its memory bounded and logged no traceback.

The fuzzing peers never use a real worker's identity: without keys every local process is trusted not to
(docs/architecture.md, "Trust model"), and ROUTER_HANDOVER gives an identity to its latest connection.
"""

import json
import os
import random
import time
from pathlib import Path

import httpx
import pytest
import torch
import zmq
from torch.nn import functional as F

from atomo_core.data import load_dataset
from services.common.launch import LocalCluster
from services.common.protocol import MAGIC, PROTOCOL_VERSION, Header, MsgType, pack_header
from services.common.replica import Replica
from services.common.spec import RunSpec
from services.worker.worker import encode_gradient, gradient_policy, step_generator

pytestmark = pytest.mark.slow

FUZZ_S = float(os.environ.get("ATOMO_FUZZ_SECONDS", "25"))  # CI default; raise it for a longer session
SEED = int(os.environ.get("ATOMO_FUZZ_SEED", "0"))
SPEC = {"model": "mlp", "steps": 1_000_000, "eval_every": 1_000_000, "checkpoint_every": 1_000_000, "workers": 1}
MiB = 1 << 20
EDGE_NUMBERS = [
    b"1.7976931348623157e308",
    b"-1.7976931348623157e308",
    b"1e400",
    b"-1",
    b"18446744073709551616",
    b"-9007199254740993",
    b"NaN",
    b"Infinity",
    b"0.5",
    b"true",
    b'"3"',
    b"[]",
    b"{}",
    b"null",
]
BAD_TEXT = [b'"\\ud800"', b'"\\udfff\\ud800"', b'"\xff\xfe"', b'"\xc0\x80"', b'"' + b"x" * 300 + b'"']


def real_messages(run_id: str) -> list[tuple[Header, list[bytes]]]:
    """Messages as a worker sends them: REGISTER, HEARTBEAT, and GRADIENTs of the mlp from the run's policy
    (dense and compressed), with a digest pair."""
    spec = RunSpec.model_validate(SPEC)
    train, _test, info = load_dataset(spec.dataset, None, seed=spec.seed)
    replica = Replica(spec, info.num_classes, info.in_channels, torch.device("cpu"))
    x, y = train.x[:32], train.y[:32]
    F.cross_entropy(replica.model(x), y).backward()

    class Run:  # what encode_gradient reads of an assignment
        pass

    run = Run()
    run.replica, run.spec, run.policy = replica, spec, gradient_policy(spec)
    compressed = [bytes(m) for m in encode_gradient(run, 5, step_generator(0, 0, 5))]
    dense = [bytes(m) for m in encode_gradient(run, 5, None, dense=True)]
    register = {"device": "cpu", "address": "host", "pid": 1234, "metrics_port": 9100}
    gradient = {"loss": 2.3, "digest_step": 4, "digest": "ab" * 16}
    return [
        (Header(MsgType.REGISTER, worker_id="{id}", meta=register), []),
        (Header(MsgType.HEARTBEAT, worker_id="{id}"), []),
        (Header(MsgType.GRADIENT, run_id, 5, "{id}", {"compute_s": 0.01, "encode_s": 0.002}, gradient), compressed),
        (Header(MsgType.GRADIENT, run_id, 5, "{id}", {"compute_s": 0.01}, {"loss": 2.3}), dense),
    ]


class Mutator:
    """Seeded mutations of one multipart message (a list of frames, the header first)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def header_text(self, header: bytes, swap: bytes) -> bytes:
        """Replace one JSON value (a number, a string, an object) of the header's body with `swap`."""
        body = bytearray(header[6:])
        starts = [i for i, c in enumerate(body) if c in b'0123456789"{-[tfn' and i > 0 and body[i - 1] in b":,["]
        if not starts:
            return header
        start = self.rng.choice(starts)
        end = start + 1
        if body[start] == ord('"'):
            end = body.index(b'"', start + 1) + 1 if b'"' in body[start + 1 :] else len(body)
        else:
            while end < len(body) and body[end] not in b",}]":
                end += 1
        return header[:6] + bytes(body[:start]) + swap + bytes(body[end:])

    def mutate(self, frames: list[bytes]) -> list[bytes]:
        frames = list(frames)
        for _ in range(self.rng.randint(1, 3)):
            kind = self.rng.randrange(9)
            i = self.rng.randrange(len(frames))
            if kind == 0 and frames[i]:  # flip bytes
                frame = bytearray(frames[i])
                for _ in range(self.rng.randint(1, 4)):
                    frame[self.rng.randrange(len(frame))] = self.rng.randrange(256)
                frames[i] = bytes(frame)
            elif kind == 1:  # truncate
                frames[i] = frames[i][: self.rng.randrange(len(frames[i]) + 1)]
            elif kind == 2:  # extra frames
                frames += [self.rng.randbytes(self.rng.randrange(64))] * self.rng.randint(1, 300)
            elif kind == 3 and len(frames) > 1:  # a frame missing
                del frames[self.rng.randrange(1, len(frames))]
            elif kind == 4:  # a frame repeated
                frames.insert(i, frames[i])
            elif kind == 5:  # a number at the edge of JSON and floats, or of the wrong type
                frames[0] = self.header_text(frames[0], self.rng.choice(EDGE_NUMBERS))
            elif kind == 6:  # text that is not UTF-8 or does not re-encode as UTF-8
                frames[0] = self.header_text(frames[0], self.rng.choice(BAD_TEXT))
            elif kind == 7:  # another message type or protocol version
                prefix = bytes([self.rng.choice([PROTOCOL_VERSION, 0, 2]), self.rng.randrange(10)])
                frames[0] = MAGIC + prefix + frames[0][6:]
            else:  # a deeply nested or wide meta
                depth = self.rng.choice([3, 9, 40])
                frames[0] = self.header_text(frames[0], b"[" * depth + b"1" + b"]" * depth)
        return frames


def dropped_total(cluster) -> float:
    text = httpx.get(f"http://127.0.0.1:{cluster.ready['metrics_port']}/metrics", timeout=5).text
    lines = [line for line in text.splitlines() if line.startswith("atomo_ps_dropped_messages_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_fuzzing_the_worker_port_leaves_the_ps_serving_and_training(tmp_path):
    with LocalCluster(tmp_path / "state", workers=1, threads=1) as cluster:
        client = cluster.client()
        client.call("submit", run_id="fuzzed", spec=SPEC)
        messages = real_messages("fuzzed")
        deadline = time.monotonic() + 60
        while (client.status()["run"] or {}).get("step", 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        step_before = client.status()["run"]["step"]
        assert step_before >= 5, "the run did not start"
        rss_before = rss_kib(cluster.ps.pid)
        drops_before = dropped_total(cluster)
        mutator = Mutator(SEED)
        rng = mutator.rng
        ctx = zmq.Context()
        sent = 0
        try:
            peers = {}
            end = time.monotonic() + FUZZ_S
            while time.monotonic() < end:
                name = f"fz{rng.randrange(6)}"
                if name not in peers or rng.random() < 0.02:  # a new connection; the old one gone, replies unread
                    if name in peers:
                        peers[name].close(linger=0)
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.IDENTITY, name.encode())
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.RCVHWM, 1)  # never reads: its replies pile up at the PS
                    sock.setsockopt(zmq.SNDHWM, 100)
                    sock.connect(f"tcp://127.0.0.1:{cluster.port}")
                    peers[name] = sock
                header, payload = rng.choice(messages)
                header = Header(header.type, header.run_id, header.step, name, header.timings, header.meta)
                frames = [pack_header(header), *payload]
                burst = rng.choice([1, 1, 1, 50, 300])  # now and then a burst of the same (small) message
                if sum(len(f) for f in frames) > 100_000:
                    burst = 1
                mutated = frames if rng.random() < 0.1 else mutator.mutate(frames)
                for _ in range(burst):
                    try:
                        peers[name].send_multipart(mutated, zmq.DONTWAIT)
                        sent += 1
                    except zmq.Again:
                        break
        finally:
            ctx.destroy(linger=0)
        time.sleep(2)  # the PS drains what is queued
        status = client.status()  # the control port answers
        assert cluster.ps.poll() is None, "the PS died"
        run = status["run"]
        assert run["run_id"] == "fuzzed" and run["state"] == "running", run
        deadline = time.monotonic() + 30
        while client.status()["run"]["step"] < run["step"] + 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.status()["run"]["step"] >= run["step"] + 20 > step_before, "training stalled after the fuzzing"
        drops = dropped_total(cluster) - drops_before
        rss_growth = (rss_kib(cluster.ps.pid) - rss_before) * 1024
        print(f"fuzz: {sent} messages in {FUZZ_S:.0f} s, {drops:.0f} dropped, RSS {rss_growth / MiB:+.1f} MiB")
        assert sent > 1000 and drops > 100
        assert rss_growth < 256 * MiB
        client.call("cancel", run_id="fuzzed")
        json.dumps(client.status(), allow_nan=False).encode("utf-8")  # all of it still strict JSON
        assert "Traceback" not in (cluster.log_dir / "ps.log").read_text(errors="replace")
