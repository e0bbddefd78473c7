"""Goodput of our framing (Server/Client: header frame + payload frames) against raw pyzmq ROUTER/DEALER.

Same loopback, same layout for both: a receiver process (the PS side, ROUTER) and a sender process (the
worker side, DEALER). One repetition is a burst of messages from the sender, timed from the first send to
the receiver's one-frame acknowledgement of the last message; goodput = payload bytes / time. Medians over
repetitions, with the raw and ours repetitions interleaved so that both see the same machine load.

    python bench/transport.py [--reps 7] [--rounds 3] [--curve] [--cases 0 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time

import numpy as np
import zmq

from services.common.keys import write_keys
from services.common.protocol import Header, MsgType
from services.common.transport import CurveKeys, SocketOptions, bind_server, connect_client

MB = 1_000_000
TIMEOUT_MS = 60_000  # no step of a repetition may wait longer: a stuck run fails instead of hanging
# (label, bytes per frame, frames per message, messages per burst)
CASES = [
    ("45MB x1 frame", 45 * MB, 1, 4),
    ("45MB x62 frames", 45 * MB // 62, 62, 4),  # a ResNet-18-sized gradient, one frame per parameter tensor
    ("0.5MB x1 frame", MB // 2, 1, 64),
]
# Sends never block (a full queue raises QueueFull): a burst must fit the send queue, here and in raw mode.
OPTIONS = SocketOptions(max_message_bytes=64 * MB, send_hwm=128, linger_ms=0)


def _raw_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    for option, value in [(zmq.SNDHWM, OPTIONS.send_hwm), (zmq.RCVHWM, OPTIONS.recv_hwm), (zmq.LINGER, 0)]:
        sock.setsockopt(option, value)
    return sock


def receiver(mode: str, burst: int, total: int, key_dir: str | None, port_queue) -> None:
    """Receive `total` messages; acknowledge every `burst`-th with one small frame."""
    ctx = zmq.Context()
    if mode == "raw":
        sock = _raw_socket(ctx, zmq.ROUTER)
        port_queue.put(sock.bind_to_random_port("tcp://127.0.0.1"))
        sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        for i in range(total):
            parts = sock.recv_multipart(copy=False)
            if (i + 1) % burst == 0:
                sock.send_multipart([parts[0].bytes, b"ack"])
        sock.close()
    else:
        keys = CurveKeys.load(key_dir, "server") if key_dir else None
        server = bind_server(ctx, "127.0.0.1", 0, OPTIONS, keys=keys)
        port_queue.put(server.port)
        ack = Header(MsgType.HEARTBEAT)
        for i in range(total):
            got = server.recv(TIMEOUT_MS)
            if got is None:
                raise TimeoutError(f"message {i} of {total} did not arrive")
            if (i + 1) % burst == 0:
                server.send(got.peer, ack)
        server.close()
    ctx.term()


def sender(mode: str, port: int, frame_bytes: int, frames: int, burst: int, reps: int, key_dir, result_queue):
    """Send `reps` bursts of `burst` messages; report the seconds of each burst."""
    ctx = zmq.Context()
    payload = [np.random.default_rng(i).integers(0, 255, frame_bytes, dtype=np.uint8) for i in range(frames)]
    endpoint = f"tcp://127.0.0.1:{port}"
    times = []
    if mode == "raw":
        sock = _raw_socket(ctx, zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"w0")
        sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        sock.connect(endpoint)
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(burst):
                sock.send_multipart(payload, copy=False)
            sock.recv_multipart()
            times.append(time.perf_counter() - start)
        sock.close()
    else:
        keys = CurveKeys.load(key_dir, "client", "client-0") if key_dir else None
        client = connect_client(ctx, endpoint, "w0", OPTIONS, keys=keys)
        for _ in range(reps):
            start = time.perf_counter()
            for step in range(burst):
                client.send(Header(MsgType.GRADIENT, "bench", step, "w0", {"compute_s": 0.1}), payload)
            if client.recv(TIMEOUT_MS) is None:
                raise TimeoutError("no acknowledgement")
            times.append(time.perf_counter() - start)
        client.close()
    ctx.term()
    result_queue.put(times)


def measure(mode: str, case: tuple, reps: int, key_dir: str | None) -> list[float]:
    """MB/s of each repetition (the first burst, which includes the connection, is left out)."""
    _, frame_bytes, frames, burst = case
    spawn = mp.get_context("spawn")
    ports, results = spawn.Queue(), spawn.Queue()
    args = (mode, burst, burst * (reps + 1), key_dir, ports)
    procs = [spawn.Process(target=receiver, args=args, daemon=True)]
    procs[0].start()
    try:
        port = ports.get(timeout=60)
        args = (mode, port, frame_bytes, frames, burst, reps + 1, key_dir, results)
        procs.append(spawn.Process(target=sender, args=args, daemon=True))
        procs[1].start()
        times = results.get(timeout=2 * TIMEOUT_MS / 1000)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            proc.kill()
    return [burst * frames * frame_bytes / MB / t for t in times[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed bursts per case and mode (default 7)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved raw/ours rounds (default 3)")
    parser.add_argument("--curve", action="store_true", help="also measure our framing over CURVE")
    parser.add_argument("--cases", nargs="*", type=int, help="indices of the cases to run (default all)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    key_dir = None
    if args.curve:
        key_dir = tempfile.mkdtemp(prefix="atomo-bench-keys-")
        write_keys(key_dir, clients=1)
    modes = ["raw", "ours"] + (["ours+curve"] if args.curve else [])
    results = []
    print(f"{'case':<18} " + " ".join(f"{m + ' MB/s':>16}" for m in modes) + f" {'ours/raw':>9}")
    for case in [CASES[i] for i in args.cases] if args.cases else CASES:
        rates = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                rates[mode] += measure(mode, case, args.reps, key_dir if mode == "ours+curve" else None)
        medians = {mode: statistics.median(r) for mode, r in rates.items()}
        ratio = medians["ours"] / medians["raw"]
        print(f"{case[0]:<18} " + " ".join(f"{medians[m]:>16.0f}" for m in modes) + f" {ratio:>9.1%}")
        results.append(
            {
                "case": case[0],
                "frame_bytes": case[1],
                "frames": case[2],
                "burst": case[3],
                "median_mb_s": medians,
                "samples_mb_s": rates,
                "ours_over_raw": ratio,
            }
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "transport goodput, loopback, two processes", "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
