"""The PS and two workers as real processes on loopback: training, bytes, replicas, malformed input.

One cluster serves every test of this file (runs are submitted over the PS's control port, one after
another), so the processes start once.
"""

import json
import math
import time

import pytest
import torch
import zmq
from helpers import dropped_counts

from atomo_core import make_codec
from atomo_core.models import build_model
from services.common.launch import LocalCluster
from services.common.protocol import Header, MsgType, pack_header

pytestmark = pytest.mark.slow

HEARTBEAT_S = 1.0
RUN_TIMEOUT_S = 120
DENSE = make_codec("dense")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("runtime")
    c = LocalCluster(state, workers=2, threads=1, heartbeat_s=HEARTBEAT_S, ps_args=("--check-every", "1"))
    c.start()
    yield c
    c.stop()
    assert c.ps.returncode == 0, "the PS did not exit cleanly on SIGTERM"


def run_to_end(cluster, run_id: str, spec: dict) -> tuple[dict, list[dict], dict]:
    """Submit `spec`, wait for the end; return the run object, its per-step records and its summary."""
    cluster.client().call("submit", run_id=run_id, spec=spec)
    run = cluster.wait_for_run(run_id, RUN_TIMEOUT_S)
    records = cluster.client().call("metrics", run_id=run_id, since=0)["records"]
    summary = json.loads((cluster.state_dir / "runs" / run_id / "summary.json").read_text())
    return run, records, summary


def final_accuracy(records: list[dict]) -> float:
    return [r["test_accuracy"] for r in records if "test_accuracy" in r][-1]


def test_svd_trains_and_sends_far_fewer_bytes_than_dense(cluster):
    """Digits on the MLP: svd (s=3) and dense both learn; svd's uplink is >= 20x and its atoms downlink
    >= 5x smaller (bytes counted by the PS from the messages it received and sent)."""
    spec = {"model": "mlp", "steps": 150, "batch_size": 64, "lr": 0.05, "eval_every": 50, "seed": 1}
    results = {}
    for codec in ("svd", "dense"):
        run, records, summary = run_to_end(cluster, f"bytes-{codec}", {**spec, "codec": {"name": codec}})
        assert run["state"] == "succeeded", run
        assert [r["step"] for r in records] == list(range(1, 151))
        # Both workers' gradients in (nearly) every step: a worker stalled by a loaded machine may be taken
        # for lost for a moment and rejoin.
        assert sum(r["k"] == 2 for r in records) >= 0.95 * len(records)
        results[codec] = (
            final_accuracy(records),
            sum(r["bytes_up"] for r in records),
            sum(r["bytes_down"] for r in records),
        )
        assert summary["bytes_up"] == results[codec][1]
    for codec, (accuracy, _, _) in results.items():
        assert accuracy >= 0.85, f"{codec}: test accuracy {accuracy:.3f}"
    up = results["dense"][1] / results["svd"][1]
    down = results["dense"][2] / results["svd"][2]
    assert up >= 20, f"uplink only {up:.1f}x smaller"
    assert down >= 5, f"downlink only {down:.1f}x smaller"


def test_atoms_downlink_replicas_agree_with_the_ps_bitwise(cluster):
    """100 steps with the `atoms` downlink: after every step each worker sends a hash of its replica's
    bytes and the PS compares it with its own model's (the PS runs with --check-every 1)."""
    spec = {"model": "lenet5", "steps": 100, "eval_every": 100, "downlink": "atoms", "momentum": 0.9}
    spec["nesterov"] = True
    run, _records, summary = run_to_end(cluster, "replicas", spec)
    assert run["state"] == "succeeded"
    # Step 0's state comes with the RUN message; every later step's is each worker's own SGD step.
    assert summary["replica_checks"] >= 2 * 99
    assert summary["replica_mismatches"] == 0
    events = cluster.client().call("events", run_id="replicas", since=0)["events"]
    assert not [e for e in events if e["type"] == "replica_resync"]


def test_model_downlink_sends_the_dense_model_and_trains(cluster):
    """The paper's downlink: the PS sends every worker the dense model each step."""
    spec = {"model": "lenet5", "steps": 100, "eval_every": 100, "downlink": "model", "seed": 3}
    run, records, _summary = run_to_end(cluster, "model-downlink", spec)
    assert run["state"] == "succeeded" and final_accuracy(records) >= 0.8
    model_bytes = sum(p.numel() for p in build_model("lenet5", 10, 1).parameters()) * 4
    # Each of the two workers receives at least the fp32 model each step (plus headers), never the atoms.
    assert all(2 * model_bytes <= r["bytes_down"] <= 2 * model_bytes + 8192 for r in records[:-1] if r["k"] == 2)


class Probe:
    """A raw pyzmq DEALER that registers as a worker, sends malformed messages, and otherwise answers each
    step with a valid (zero) gradient so that the run goes on."""

    def __init__(self, cluster, shapes):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, b"probe")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{cluster.port}")
        self.shapes = shapes
        self.send(Header(MsgType.REGISTER, worker_id="probe", meta={"device": "cpu"}))

    def send(self, header: Header, frames=()) -> None:
        self.sock.send_multipart([pack_header(header), *frames])

    def gradient(self, run_id, step, frames, meta=None) -> None:
        self.send(Header(MsgType.GRADIENT, run_id, step, "probe", meta=meta or {"loss": 1.0}), frames)

    def zeros(self) -> list[bytes]:
        return [bytes(DENSE.encode(torch.zeros(s))) for s in self.shapes]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def test_malformed_messages_are_dropped_counted_and_harmless(cluster):
    """Garbage, truncated, misshapen, oversized and NaN messages on the PS's worker port: each dropped and
    counted by reason in atomo_ps_dropped_messages_total (read over HTTP), and the run still succeeds."""
    shapes = [tuple(p.shape) for p in build_model("mlp", 10, 1).parameters()]
    before = dropped_counts(cluster)
    probe = Probe(cluster, shapes)
    cluster.wait_for_workers(3)
    run_id = "malformed"
    spec = {"model": "mlp", "steps": 60, "eval_every": 60, "workers": 3, "min_workers": 2, "seed": 2}
    cluster.client().call("submit", run_id=run_id, spec=spec)
    sent_bad = False
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if not probe.sock.poll(int(HEARTBEAT_S * 1000)):
            probe.send(Header(MsgType.HEARTBEAT, worker_id="probe"))
            continue
        frames = probe.sock.recv_multipart()
        head = json.loads(frames[0][6:])
        kind = frames[0][5]
        if kind == MsgType.STOP:
            break
        if kind not in (MsgType.RUN, MsgType.UPDATE) or not head["meta"].get("compute"):
            continue
        step = head["step"]
        if not sent_bad:
            sent_bad = True
            zeros = probe.zeros()
            nan = bytes(DENSE.encode(torch.full(shapes[0], math.nan)))
            probe.sock.send(b"\x00 not a header")  # garbage
            probe.gradient(run_id, step, [zeros[0][: len(zeros[0]) // 2], *zeros[1:]])  # truncated message
            probe.gradient(run_id, step, zeros[:-1])  # a frame missing
            probe.gradient(run_id, step, [bytes(DENSE.encode(torch.zeros(7))), *zeros[1:]])  # wrong shape
            probe.gradient(run_id, step, [nan, *zeros[1:]])  # NaN gradient
            body = {"run_id": run_id, "step": step, "worker_id": "probe", "timings": {}, "meta": {"pad": "x" * 70_000}}
            probe.sock.send_multipart([b"ATHD\x01\x04" + json.dumps(body).encode(), *zeros])  # oversized header
            probe.gradient("another-run", step, zeros)
            probe.gradient(run_id, step + 5, zeros)
        probe.gradient(run_id, step, probe.zeros())
    run = cluster.wait_for_run(run_id, RUN_TIMEOUT_S)
    assert sent_bad and run["state"] == "succeeded" and run["step"] == 60
    # A frame beyond MAXMSGSIZE (the largest tensor of any model): libzmq drops the connection unread.
    probe.sock.send_multipart([pack_header(Header(MsgType.HEARTBEAT, worker_id="probe")), bytes(12 << 20)])
    probe.close()
    assert cluster.client().ping()["ok"] and cluster.ps.poll() is None
    after = dropped_counts(cluster)
    expected = {
        "bad_header": 1,
        "bad_payload": 1,
        "bad_frames": 1,
        "bad_shape": 1,
        "non_finite": 1,
        "oversized": 1,
        "wrong_run": 1,
        "bad_step": 1,
    }
    for reason, count in expected.items():
        assert after.get(reason, 0) - before.get(reason, 0) >= count, (reason, before, after)
