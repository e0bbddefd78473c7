"""`atomo bench table6`: the paper's Table 6 (speed-ups to accuracy targets over dense SGD) with 8 and 16
workers, simulated on one machine with exact gradients and a virtual clock.

What is real and what is virtual:
- Training is exact. Every simulated worker computes its real gradient on its own shard of the data
  (atomo_core.data.BatchStream, as a worker process does), from the PS's parameters and BatchNorm buffers,
  and encodes it with the real codec through the run's real per-layer policy
  (services.worker.worker.gradient_policy, one LayerPolicy per worker, so error feedback is per worker).
  The PS's step is the real one: services.common.replica.Replica parses and decodes the n messages' wire
  bytes, averages them and takes the SGD step (Section 2), as the PS process does.
- The clock is virtual, per step:
      T = C(b) + E + up + D + P + down + A
  C(b): a worker's forward and backward pass at its batch b, E: its encode, both from the cost table
  (measured on this machine at the start, `measure_costs`, or read from a JSON file measured elsewhere, e.g.
  on a GPU); the workers run in parallel, so the step waits for one of them. up: the n workers' messages of
  that step pushed at once, by n sender processes, through the shaped PS link to one receiver (the real
  bytes over real TCP sockets in network namespaces, services.bench.netem; `LinkReplay`). D and P: the PS's
  decoding of the n messages and its optimizer step, measured as they run. down: the PS sending each
  worker the downlink (`atoms`: the n messages; `model`: the dense model), replayed the same way. A: a
  worker applying the update, D + P with `atoms` (it replays the PS's step), 0 with `model`.
- Replaying every step of a dense run at 16 workers would take minutes per run, so the links replay every
  `replay_every`-th step (and the first); the other steps' up and down times come from a line
  time = o + bytes / R fitted, per worker count and direction, to all the replays of that worker count
  (every codec's), and the report gives the fit's residuals.
- The clock is checked once against a real run: a PS and 2 worker processes (services.bench.runner) over
  the same emulated link, svd s=3, and the virtual clock of the same configuration; the error is reported.

Without root or iproute2 the replay runs on loopback (no shaping) and the results say why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from services.bench.netem import LinkProfile, Network, NetworkUnavailable
from services.bench.scale import _fit_line

MODEL = "vgg11_bn_narrow"
FALLBACK_DATASET = "digits"  # until fashion-mnist is installed
PREFERRED_DATASET = "fashion-mnist"
BATCH_SIZE = 64  # global: 8 per worker with 8 workers, 4 with 16
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
SEED = 0
WORKERS = (8, 16)
STEPS, QUICK_STEPS = 50, 6
EVAL_EVERY, QUICK_EVAL_EVERY = 5, 3
SEEDS = 3  # the speed-ups are medians over seeds, with their range
TEST_SIZE, QUICK_TEST_SIZE = 10_000, 200  # the whole Fashion-MNIST test set; --quick a smoke test
REPLAY_EVERY, QUICK_REPLAY_EVERY = 10, 2
BANDWIDTH_MBIT = 1000.0
VALIDATION_STEPS, QUICK_VALIDATION_STEPS = 20, 8
COST_REPS = 5
TARGET_SPACING = 0.03  # the targets are 3 points apart, as Table 6's (65%, 68%, 71%, 74%)
TARGETS = 4
TABLE6_DOC = Path("docs/benchmarks-table6.md")
TABLE6_JSON = Path("docs/benchmarks/table6.json")  # committed beside the report, so its figures can be rechecked
NETWORK_NAME = "atomo-t6"
PORT = 5601


@dataclass(frozen=True)
class Codec:
    """A codec of the experiment: its label, CodecSpec fields and downlink."""

    label: str
    spec: dict
    downlink: str = "atoms"


def codecs(topk_budget: int, quick: bool) -> list[Codec]:
    """dense (model downlink), qsgd b=4 and b=8 (the best is reported), svd s=3, topk at svd s=3's bytes,
    powersgd rank 2; --quick: dense and svd s=3."""
    out = [Codec("dense", {"name": "dense"}, "model"), Codec("svd s=3", {"name": "svd", "budget": 3})]
    if not quick:
        out += [Codec(f"qsgd b={b}", {"name": "qsgd", "bits": b}) for b in (4, 8)]
        out += [Codec(f"topk k={topk_budget}", {"name": "topk", "budget": topk_budget})]
        out += [Codec("powersgd r=2", {"name": "powersgd", "rank": 2})]
    return out


def run_spec(codec: Codec, workers: int, steps: int, seed: int, dataset: str):
    from services.common.spec import CodecSpec, RunSpec

    return RunSpec(
        name=f"table6-{workers}",
        model=MODEL,
        dataset=dataset,
        codec=CodecSpec(**codec.spec),
        workers=workers,
        batch_size=BATCH_SIZE,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        steps=steps,
        eval_every=steps,
        checkpoint_every=steps,
        min_workers=workers,
        downlink=codec.downlink,
        seed=seed,
        device="cpu",
    )


# -- the data ----------------------------------------------------------------------------------------------------


def pick_dataset() -> str:
    from services.common.spec import DATASETS

    return PREFERRED_DATASET if PREFERRED_DATASET in DATASETS else FALLBACK_DATASET


def load(dataset: str, test_size: int):
    from atomo_core.data import Split, load_dataset

    train, test, info = load_dataset(dataset, seed=SEED)
    return train, Split(test.x[:test_size], test.y[:test_size]), info


# -- the cost table ----------------------------------------------------------------------------------------------


@dataclass
class CostTable:
    """Seconds of a worker's forward+backward at each per-worker batch, and of one encode per codec label."""

    device: str
    source: str
    compute_s: dict[str, float]  # str(batch) -> s
    encode_s: dict[str, float]  # label -> s

    @classmethod
    def read(cls, path: Path) -> CostTable:
        data = json.loads(Path(path).read_text())
        try:
            return cls(
                str(data["device"]),
                f"file {path}",
                {str(k): float(v) for k, v in data["compute_s"].items()},
                {str(k): float(v) for k, v in data["encode_s"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: a cost table needs device, compute_s and encode_s ({exc})") from None

    def compute(self, batch: int) -> float:
        if str(batch) not in self.compute_s:
            raise KeyError(f"the cost table ({self.source}) has no compute time at batch {batch}")
        return self.compute_s[str(batch)]

    def encode(self, label: str) -> float:
        if label not in self.encode_s:
            raise KeyError(f"the cost table ({self.source}) has no encode time for {label}")
        return self.encode_s[label]


def _fastest_time(fn, reps: int) -> float:
    """The fastest of `reps` timed calls after a warm-up: on a machine shared with other work, the least
    disturbed one."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_costs(train, info, batches: Sequence[int], cases: Sequence[Codec], dataset: str, reps: int) -> CostTable:
    """The fastest of `reps` forward+backward passes at each batch and encodes of each codec (through the
    per-layer policy, of a real gradient at the smallest batch), on this machine's CPU."""
    from atomo_core.models import build_model
    from services.worker.worker import gradient_policy, step_generator

    torch.manual_seed(SEED)
    model = build_model(MODEL, info.num_classes, info.in_channels)
    model.train()

    def backward(batch: int) -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(train.x[:batch]), train.y[:batch]).backward()

    compute = {str(b): _fastest_time(lambda b=b: backward(b), reps) for b in batches}
    backward(min(batches))
    grads = [p.grad.detach().clone() for p in model.parameters()]
    encode = {}
    for case in cases:
        policy = gradient_policy(run_spec(case, 2, 1, SEED, dataset))
        counter = iter(range(10**6))
        encode[case.label] = _fastest_time(
            lambda p=policy, c=counter: p.encode(grads, step_generator(0, 0, next(c))), reps
        )
    return CostTable(f"cpu ({os.cpu_count()} cores)", "measured on this machine at the start", compute, encode)


# -- replaying the bytes over the emulated links --------------------------------------------------------------------


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left) if hasattr(stream, "read") else stream.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"stream closed with {left} of {n} bytes left")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receiver(port: int, senders: int) -> None:
    """The PS's end: accept `senders` connections; per step (stdin: "<down bytes>\\n", the payload, "go\\n"),
    time the receipt of every sender's message (length-prefixed) and the sending of the payload to each
    (until each acknowledges with one byte); print "<up_s> <down_s>"."""
    import socket

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(senders)
    print("listening", flush=True)
    conns = []
    for _ in range(senders):
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(conn)
    pool = ThreadPoolExecutor(senders)
    stdin = sys.stdin.buffer

    def receive(conn) -> None:
        (n,) = struct.unpack("!Q", _read_exact(conn, 8))
        _read_exact(conn, n)

    def send(conn, payload: bytes) -> None:
        conn.sendall(struct.pack("!Q", len(payload)) + payload)
        _read_exact(conn, 1)

    print("ready", flush=True)
    while line := stdin.readline():
        payload = _read_exact(stdin, int(line))
        stdin.readline()  # "go"
        start = time.perf_counter()
        list(pool.map(receive, conns))
        received = time.perf_counter()
        list(pool.map(send, conns, [payload] * len(conns)))
        done = time.perf_counter()
        print(f"{received - start} {done - received}", flush=True)


def _sender(host: str, port: int) -> None:
    """A worker's end: per step (stdin: "<bytes>\\n" and the payload), say "ready", wait for "go", push the
    payload to the PS, then read the PS's downlink message and acknowledge it."""
    import socket

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stdin = sys.stdin.buffer
    while line := stdin.readline():
        payload = _read_exact(stdin, int(line))
        print("ready", flush=True)
        stdin.readline()  # "go"
        conn.sendall(struct.pack("!Q", len(payload)) + payload)
        (n,) = struct.unpack("!Q", _read_exact(conn, 8))
        _read_exact(conn, n)
        conn.sendall(b"!")


class LinkReplay:
    """n sender processes and one receiver behind the PS's link (`link` None or emulation unavailable:
    loopback, `reason` says why). `step(up, down)` pushes each sender's bytes `up[i]` at once to the
    receiver, then the receiver's `down` to every sender, and returns the two durations (s)."""

    def __init__(self, senders: int, link: LinkProfile | None, log_dir: Path):
        self.senders, self.link = senders, link
        self.network: Network | None = None
        self.reason: str | None = None
        self.procs: list[subprocess.Popen] = []
        if link is not None:
            self.reason = Network.check()
            if self.reason is None:
                try:
                    hosts = ["ps", *(f"w{i}" for i in range(senders))]
                    self.network = Network(hosts, link, name=NETWORK_NAME).start()
                except NetworkUnavailable as exc:
                    self.reason = str(exc)
        else:
            self.reason = "no link given (loopback)"
        wrap = (lambda host, argv: self.network.command(host, argv)) if self.network else (lambda host, argv: argv)
        address = self.network.address("ps") if self.network else "127.0.0.1"
        port = PORT if self.network else _free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        me = [sys.executable, "-m", "services.bench.simulate"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}

        def start(host: str, argv: list[str], name: str) -> subprocess.Popen:
            err = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
            proc = subprocess.Popen(
                wrap(host, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env
            )
            err.close()
            return proc

        try:
            self.receiver = start("ps", [*me, "_receive", str(port), str(senders)], "receiver")
            self._expect(self.receiver, "listening")
            self.procs = [start(f"w{i}", [*me, "_send", address, str(port)], f"sender-{i}") for i in range(senders)]
            self._expect(self.receiver, "ready")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _expect(proc: subprocess.Popen, word: str) -> str:
        line = proc.stdout.readline().decode().strip()
        if not line.startswith(word):
            raise RuntimeError(f"replay process {proc.args[-3:]} said {line!r}, expected {word!r} (see its log)")
        return line

    @property
    def emulated(self) -> bool:
        return self.network is not None

    def step(self, up: Sequence[bytes], down: bytes) -> tuple[float, float]:
        if len(up) != self.senders:
            raise ValueError(f"{len(up)} payloads for {self.senders} senders")
        for proc, payload in zip(self.procs, up, strict=True):
            proc.stdin.write(b"%d\n" % len(payload) + payload)
            proc.stdin.flush()
        for proc in self.procs:
            self._expect(proc, "ready")
        self.receiver.stdin.write(b"%d\n" % len(down) + down)
        self.receiver.stdin.flush()
        for proc in self.procs:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        self.receiver.stdin.write(b"go\n")
        self.receiver.stdin.flush()
        up_s, down_s = map(float, self.receiver.stdout.readline().split())
        return up_s, down_s

    def close(self) -> None:
        for proc in [*self.procs, getattr(self, "receiver", None)]:
            if proc is None:
                continue
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()
        self.procs = []
        if self.network is not None:
            self.network.close()
            self.network = None

    def __enter__(self) -> LinkReplay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one simulated run ---------------------------------------------------------------------------------------------


@dataclass
class SimRun:
    """One codec at one worker count and seed: per step bytes and times, the evaluations."""

    label: str
    workers: int
    seed: int
    downlink: str
    steps: list[dict] = field(default_factory=list)  # bytes_up, bytes_down, decode_s, update_s, up_s/down_s
    evals: list[tuple[int, float]] = field(default_factory=list)  # (steps done, test accuracy)
    wall_s: float = 0.0
    replay: dict = field(default_factory=dict)  # {"emulated", "reason"} of the link replay


def _run_path(out: Path, run: SimRun) -> Path:
    name = f"w{run.workers}-s{run.seed}-{run.label}".replace(" ", "-").replace("=", "")
    return out / "runs" / f"{name}.json"


def _save_run(out: Path, config: dict, run: SimRun) -> None:
    path = _run_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "run": asdict(run)}) + "\n", encoding="utf-8")


def _saved_runs(out: Path, config: dict) -> dict[tuple[str, int, int], SimRun]:
    """The runs of this configuration already in `out` (a rerun with more seeds or workers adds to them)."""
    found = {}
    for path in sorted((out / "runs").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("config") == config:
            run = SimRun(**data["run"])
            run.evals = [tuple(e) for e in run.evals]
            found[run.label, run.workers, run.seed] = run
    return found


def simulate(
    codec: Codec,
    workers: int,
    seed: int,
    steps: int,
    data,
    dataset: str,
    replay: LinkReplay,
    replay_every: int,
    eval_every: int,
) -> SimRun:
    """Train `codec` with `workers` simulated workers for `steps` steps (see the module's docstring)."""
    from atomo_core.data import BatchStream
    from services.common.replica import Replica, learning_rate
    from services.ps.evaluate import Evaluator
    from services.worker.worker import DENSE_POLICY, gradient_policy, step_generator

    started = time.perf_counter()
    train, test, info = data
    spec = run_spec(codec, workers, steps, seed, dataset)
    torch.manual_seed(seed)
    ps = Replica(spec, info.num_classes, info.in_channels, torch.device("cpu"))
    evaluator = Evaluator(MODEL, info.num_classes, info.in_channels, test, torch.device("cpu"))
    streams = [
        BatchStream(train, i, workers, BATCH_SIZE // workers, seed, augment=info.augment) for i in range(workers)
    ]
    policies = [gradient_policy(spec) for _ in range(workers)]
    run = SimRun(codec.label, workers, seed, codec.downlink)
    model = ps.model
    try:
        for step in range(steps):
            buffers = [b.detach().clone() for b in ps.buffers]
            ps.begin_step()
            frames_of, decode_s = [], 0.0
            for i in range(workers):  # 1. each worker: its batch, forward and backward, encode
                with torch.no_grad():
                    for b, saved in zip(ps.buffers, buffers, strict=True):
                        b.copy_(saved)
                model.train()
                model.zero_grad(set_to_none=True)
                x, y = streams[i].batch(step)
                F.cross_entropy(model(x), y).backward()
                grads = [p.grad.detach() for p in ps.params]
                try:
                    messages = policies[i].encode(grads, step_generator(seed, i, step))
                except (RuntimeError, ValueError):  # as a worker does: this gradient goes dense
                    messages = DENSE_POLICY.encode(grads)
                frames = [bytes(m) for m in messages + DENSE_POLICY.encode([b.detach() for b in ps.buffers])]
                frames_of.append(frames)
                start = time.perf_counter()  # 2. the PS decodes and adds it
                ps.accumulate(ps.parse_gradient(frames))
                decode_s += time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()  # 3. the PS's optimizer step
            ps.finish_step(learning_rate(spec, step, steps))
            update_s = time.perf_counter() - start
            ups = [b"".join(f) for f in frames_of]
            if codec.downlink == "atoms":
                down_len = sum(len(u) for u in ups)
            else:
                state = [bytes(m) for m in ps.state_messages(with_momentum=False)[0]]
                down_len = sum(len(s) for s in state)
            record = {
                "bytes_up": sum(len(u) for u in ups),
                "bytes_down": down_len * workers,
                "decode_s": decode_s,
                "update_s": update_s,
            }
            if step % replay_every == 0:  # 4. the bytes over the links, for real
                down = b"".join(ups) if codec.downlink == "atoms" else b"".join(state)
                record["up_s"], record["down_s"] = replay.step(ups, down)
            run.steps.append(record)
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                with torch.no_grad():
                    accuracy, _ = evaluator.evaluate({k: v.detach().clone() for k, v in model.state_dict().items()})
                run.evals.append((step + 1, accuracy))
    finally:
        evaluator.close(0)
    run.wall_s = time.perf_counter() - started
    return run


# -- the virtual clock -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkFit:
    """time = overhead + bytes / rate for one direction at one worker count, fitted to the replays."""

    overhead_s: float
    rate_bps: float
    samples: int
    residual: float  # mean |fitted / replayed - 1|

    def time(self, nbytes: float) -> float:
        return self.overhead_s + (nbytes / self.rate_bps if math.isfinite(self.rate_bps) else 0.0)


def fit_link(samples: Sequence[tuple[float, float]]) -> LinkFit:
    """A LinkFit to (bytes, seconds) samples (ValueError without any)."""
    if not samples:
        raise ValueError("no replayed step to fit the link to")
    overhead, inverse_rate = _fit_line([b for b, _ in samples], [t for _, t in samples])
    rate = 1.0 / inverse_rate if inverse_rate > 0 else math.inf
    fit = LinkFit(overhead, rate, len(samples), 0.0)
    residual = statistics.fmean(abs(fit.time(b) / t - 1) for b, t in samples if t > 0)
    return LinkFit(overhead, rate, len(samples), residual)


def step_times(run: SimRun, costs: CostTable, up: LinkFit, down: LinkFit) -> list[dict]:
    """Each step's virtual time and its parts (s): replayed link times where the step was replayed, else the
    fitted lines'."""
    batch = BATCH_SIZE // run.workers
    worker = costs.compute(batch) + costs.encode(run.label)
    out = []
    for s in run.steps:
        up_s = s.get("up_s", up.time(s["bytes_up"]))
        down_s = s.get("down_s", down.time(s["bytes_down"]))
        apply = s["decode_s"] + s["update_s"] if run.downlink == "atoms" else 0.0
        parts = {"worker_s": worker, "up_s": up_s, "ps_s": s["decode_s"] + s["update_s"], "down_s": down_s}
        parts["apply_s"] = apply
        parts["step_s"] = sum(parts.values())
        out.append(parts)
    return out


def time_to_accuracy(run: SimRun, times: list[dict], target: float) -> float | None:
    """Virtual seconds until the first evaluation at or above `target` (None if never)."""
    clock = [0.0]
    for t in times:
        clock.append(clock[-1] + t["step_s"])
    return next((clock[done] for done, acc in run.evals if acc >= target), None)


BIASED = ("topk", "powersgd")  # the biased baselines (error feedback): not among Table 6's methods


def choose_targets(runs: Sequence[SimRun], count: int = TARGETS, spacing: float = TARGET_SPACING) -> list[float]:
    """`count` targets `spacing` apart, the highest the best accuracy that every run of an unbiased codec
    reached (floored to 0.5%), as in Table 6, whose methods (all unbiased) all reach 74%; a biased baseline
    that does not reach a target shows no time for it."""
    unbiased = [r for r in runs if r.label.split()[0] not in BIASED] or list(runs)
    top = min(max(acc for _, acc in r.evals) for r in unbiased)
    top = math.floor(top * 200) / 200
    return [round(top - spacing * i, 4) for i in reversed(range(count)) if top - spacing * i > 0]


# -- the check against a real run ------------------------------------------------------------------------------------


def validate(out: Path, codec: Codec, steps: int, data, dataset: str, costs: CostTable, link: LinkProfile | None):
    """A real PS and 2 workers (services.bench.runner.Group) over `link`, and the virtual clock of the same
    configuration: their mean step times (after runner.WARMUP_STEPS) and the error of the virtual one."""
    from services.bench import runner
    from services.bench.suite import Case, CodecCase
    from services.train import load_records

    spec = run_spec(codec, 2, steps, SEED, dataset)

    @dataclass
    class RealCase(Case):
        def run_spec(self):
            return spec

    case = RealCase(
        phase="validate",
        codec=CodecCase(codec.label, codec.spec, codec.label.split()[0]),
        profile="custom" if link else "loopback",
        bandwidth_mbit=link.bandwidth_mbit if link else None,
        latency_ms=link.latency_ms if link else None,
        workers=2,
        momentum=MOMENTUM,
        lr=LR,
        steps=steps,
        downlink=codec.downlink,
    )
    emulated = link is not None and Network.check() is None
    with runner.Group(out, case.profile, link if emulated else None, 2) as group:
        record = group.run(case)
    if record["state"] != "succeeded":
        return {"error": f"the real run {record['state']}: {record['error']}"}
    rows = [r for r in load_records(out / "runs" / case.case_id) if r["step"] > runner.WARMUP_STEPS]
    real = (rows[-1]["wall_s"] - rows[0]["wall_s"]) / (len(rows) - 1)
    with LinkReplay(2, link, out / "logs" / "validate-replay") as replay:
        sim = simulate(codec, 2, SEED, steps, data, dataset, replay, 1, steps)
    up = fit_link([(s["bytes_up"], s["up_s"]) for s in sim.steps])
    down = fit_link([(s["bytes_down"], s["down_s"]) for s in sim.steps])
    virtual_steps = step_times(sim, costs, up, down)[runner.WARMUP_STEPS + 1 :]
    virtual = statistics.fmean(t["step_s"] for t in virtual_steps)
    parts = {k: statistics.fmean(t[k] for t in virtual_steps) for k in virtual_steps[0]}
    measured = {k: statistics.fmean(r[k] for r in rows if r.get(k) is not None) for k in ("compute_s", "encode_s")}
    # The same clock with the real workers' own compute and encode in place of the table's: what is left of
    # the error is the clock's communication and PS parts.
    own = virtual - parts["worker_s"] + measured["compute_s"] + measured["encode_s"]
    return {
        "codec": codec.label,
        "workers": 2,
        "steps": steps,
        "emulated": emulated,
        "real_step_s": real,
        "virtual_step_s": virtual,
        "error": virtual / real - 1,
        "virtual_parts": parts,
        "virtual_step_s_own_compute": own,
        "error_own_compute": own / real - 1,
        "real_worker_parts": measured,
    }


# -- the experiment ----------------------------------------------------------------------------------------------------


def topk_budget(data, dataset: str) -> int:
    """The top-k budget whose message bytes match svd s=3's on a real gradient of the model (one encode each:
    top-k's bytes are linear in k)."""
    from atomo_core.models import build_model
    from services.worker.worker import gradient_policy, step_generator

    train, _, info = data
    torch.manual_seed(SEED)
    model = build_model(MODEL, info.num_classes, info.in_channels)
    F.cross_entropy(model(train.x[:8]), train.y[:8]).backward()
    grads = [p.grad for p in model.parameters()]

    def nbytes(spec: dict) -> int:
        policy = gradient_policy(run_spec(Codec("x", spec), 2, 1, SEED, dataset))
        return sum(len(m) for m in policy.encode(grads, step_generator(0, 0, 0)))

    target = nbytes({"name": "svd", "budget": 3})
    low, high = nbytes({"name": "topk", "budget": 1000}), nbytes({"name": "topk", "budget": 2000})
    return max(1, round(1000 + (target - low) / ((high - low) / 1000)))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_experiment(args: argparse.Namespace) -> dict:
    from services.bench.runner import machine

    started = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or pick_dataset()
    data = load(dataset, args.test_size)
    args.test_size_used = len(data[1].y)  # the test split may hold fewer images than asked for
    link = None if args.no_netem else LinkProfile(args.bandwidth, 0.0)
    reason = "--no-netem given" if args.no_netem else Network.check()
    print(
        f"atomo bench table6: {MODEL} on {dataset}, workers {list(args.workers)}, seeds {args.seeds}, "
        f"{args.steps} steps, link {'loopback' if reason else f'{args.bandwidth:g} Mbit/s'}"
        + (f" ({reason})" if reason else "")
        + f"; results in {out}",
        flush=True,
    )
    budget = topk_budget(data, dataset)
    cases = codecs(budget, args.quick)
    if args.codecs:
        keep = {k.strip() for k in args.codecs.split(",") if k.strip()}
        unknown = keep - {c.label for c in cases} - {c.label.split()[0] for c in cases}
        if unknown:
            raise SystemExit(f"atomo bench table6: --codecs: no codec {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c.label in keep or c.label.split()[0] in keep]
    batches = sorted({BATCH_SIZE // n for n in (*args.workers, 2)})
    kept = out / "costs.json"
    if args.costs:
        costs = CostTable.read(args.costs)
    elif kept.exists():  # the runs already in the folder were clocked with it
        costs = CostTable(**json.loads(kept.read_text()))
    else:
        print("measuring the cost table (forward+backward per batch, encode per codec) ...", flush=True)
        costs = measure_costs(data[0], data[2], batches, cases, dataset, 2 if args.quick else COST_REPS)
        kept.write_text(json.dumps(asdict(costs), indent=2) + "\n")
    print(f"costs ({costs.source}): compute {costs.compute_s}, encode {costs.encode_s}", flush=True)
    # ETA: worker-steps done so far against the wall time they took (the first estimate from the table)
    per_unit = statistics.fmean(costs.compute_s.values()) + statistics.fmean(costs.encode_s.values()) * 1.5
    done_units, done_wall = 0, 0.0
    runs: list[SimRun] = []
    config = {
        "dataset": dataset,
        "steps": args.steps,
        "replay_every": args.replay_every,
        "eval_every": args.eval_every,
        "test_size": args.test_size_used,
        "bandwidth_mbit": None if reason else args.bandwidth,
    }
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    saved = _saved_runs(out, config)
    todo = [(n, seed, c) for n in args.workers for seed in seeds for c in cases if (c.label, n, seed) not in saved]
    total_units = sum(n * args.steps for n, _, _ in todo)
    if len(todo) < len(args.workers) * len(seeds) * len(cases):
        print(f"{len(saved)} runs of this configuration already in {out}: {len(todo)} to run", flush=True)
    for n in args.workers:
        mine = [(seed, c) for m, seed, c in todo if m == n]
        if not mine:
            continue
        with LinkReplay(n, link, out / "logs" / f"replay-w{n}") as replay:
            for seed, case in mine:
                run = simulate(case, n, seed, args.steps, data, dataset, replay, args.replay_every, args.eval_every)
                run.replay = {"emulated": replay.emulated, "reason": replay.reason}
                _save_run(out, config, run)
                runs.append(run)
                done_units += n * args.steps
                done_wall += run.wall_s
                eta = (total_units - done_units) * (done_wall / done_units if done_units else per_unit)
                best = max(acc for _, acc in run.evals)
                print(
                    f"[{len(runs)}/{len(todo)}] w{n} seed {seed} "
                    f"{case.label:<14} {args.steps} steps in {run.wall_s:.1f}s, best acc {best:.3f} | "
                    f"elapsed {_duration(time.time() - started)}, ETA {_duration(eta)} (+ the check)",
                    flush=True,
                )
    runs = [
        r
        for r in _saved_runs(out, config).values()
        if r.workers in args.workers and r.label in {c.label for c in cases}
    ]
    runs.sort(key=lambda r: (r.workers, r.seed, [c.label for c in cases].index(r.label)))
    replay_info = {n: next(r.replay for r in runs if r.workers == n) for n in args.workers}
    validation = None
    checked = out / "validation.json"
    if checked.exists():
        validation = json.loads(checked.read_text())
        print(f"the check against a real run: from {checked}", flush=True)
    elif not args.no_validate:
        print("checking the virtual clock against a real PS and 2 workers (svd s=3) ...", flush=True)
        svd = next(c for c in cases if c.label == "svd s=3")
        validation = validate(
            out, svd, args.validation_steps, data, dataset, measure_for_two(costs, data, cases, dataset, args), link
        )
        print(f"check: {json.dumps(validation)}", flush=True)
        if "real_step_s" in validation:
            checked.write_text(json.dumps(validation, indent=2) + "\n")
    result = summarize(runs, costs, args, dataset, budget, replay_info, validation)
    history = out / "commands.json"
    commands = json.loads(history.read_text()) if history.exists() else []
    commands.append({"command": shlex.join(["atomo", "bench", "table6", *args.argv]), "wall_s": time.time() - started})
    history.write_text(json.dumps(commands, indent=2) + "\n")
    result.update(
        commands=commands,
        command=commands[-1]["command"],
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        wall_s=time.time() - started,
        machine=machine(),
        link={"bandwidth_mbit": None if reason else args.bandwidth, "emulated": reason is None, "reason": reason},
    )
    (out / "table6.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    report = args.report or (out / "report.md" if args.quick or args.no_netem else TABLE6_DOC)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(result), encoding="utf-8")
    if report == TABLE6_DOC:
        TABLE6_JSON.parent.mkdir(parents=True, exist_ok=True)
        TABLE6_JSON.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"report: {report}  ({_duration(time.time() - started)})", flush=True)
    return result


def report_from(source: Path, report: Path | None) -> int:
    """Regenerate the report from a table6.json or the results folder that holds one (default report:
    docs/benchmarks-table6.md for a file, <folder>/report.md for a folder); nothing runs."""
    path = source / "table6.json" if source.is_dir() else source
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        text = render(result)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"atomo bench table6: --report-from: {path} is not a readable table6.json ({exc!r})", file=sys.stderr)
        return 2
    target = report or (TABLE6_DOC if source.is_file() else source / "report.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"report: {target}", flush=True)
    return 0


def measure_for_two(costs: CostTable, data, cases, dataset, args) -> CostTable:
    """The table has the 2-worker batch already when measured here; a table from a file is for another device
    and cannot time this CPU's real run, so the check measures this CPU's."""
    if costs.source.startswith("measured"):
        return costs
    return measure_costs(data[0], data[2], [BATCH_SIZE // 2], cases, dataset, 2 if args.quick else COST_REPS)


def summarize(runs, costs, args, dataset, budget, replay_info, validation) -> dict:
    fits = {}
    for n in args.workers:
        mine = [r for r in runs if r.workers == n]
        samples = [s for r in mine for s in r.steps if "up_s" in s]
        fits[n] = {
            "up": fit_link([(s["bytes_up"], s["up_s"]) for s in samples]),
            "down": fit_link([(s["bytes_down"], s["down_s"]) for s in samples]),
        }
    targets = {n: args.targets or choose_targets([r for r in runs if r.workers == n]) for n in args.workers}
    rows = []
    for r in runs:
        times = step_times(r, costs, fits[r.workers]["up"], fits[r.workers]["down"])
        parts = {k: statistics.fmean(t[k] for t in times) for k in times[0]}
        rows.append(
            {
                "label": r.label,
                "workers": r.workers,
                "seed": r.seed,
                "downlink": r.downlink,
                "evals": r.evals,
                "mean_parts": parts,
                "mean_bytes_up": statistics.fmean(s["bytes_up"] for s in r.steps),
                "mean_bytes_down": statistics.fmean(s["bytes_down"] for s in r.steps),
                "tta": {str(t): time_to_accuracy(r, times, t) for t in targets[r.workers]},
                "wall_s": r.wall_s,
            }
        )
    return {
        "model": MODEL,
        "parameters": _parameters(),
        "dataset": dataset,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "momentum": MOMENTUM,
        "steps": args.steps,
        "seeds": sorted({r.seed for r in runs}),
        "runs_wall_s": sum(r.wall_s for r in runs),
        "workers": list(args.workers),
        "replay_every": args.replay_every,
        "eval_every": args.eval_every,
        "test_size": args.test_size_used,
        "topk_budget": budget,
        "quick": args.quick,
        "targets": {str(n): t for n, t in targets.items()},
        "costs": asdict(costs),
        "replay": {str(n): v for n, v in replay_info.items()},
        "link_fits": {str(n): {d: asdict(f) for d, f in v.items()} for n, v in fits.items()},
        "runs": rows,
        "validation": validation,
    }


def _parameters() -> int:
    from atomo_core.models import build_model

    return sum(p.numel() for p in build_model(MODEL, 10, 1).parameters())


def speedups(result: dict) -> dict:
    """{workers: {target: {label: (median, lowest, highest, seeds) of dense's time over the label's, per
    seed}}}, with `qsgd best` (the fastest qsgd of each seed) and `svd s=3 / qsgd best` likewise."""
    out: dict = {}
    for n in result["workers"]:
        rows = [r for r in result["runs"] if r["workers"] == n]
        by = {(r["label"], r["seed"]): r for r in rows}
        labels = list(dict.fromkeys(r["label"] for r in rows))
        seeds = sorted({r["seed"] for r in rows})
        out[n] = {}
        for t in map(str, result["targets"][str(n)]):
            cell = {}
            for lb in labels + ["qsgd best", "svd s=3 / qsgd best"]:
                ratios = []
                for s in seeds:
                    dense = by.get(("dense", s), {}).get("tta", {}).get(t)
                    qsgd = [by[q, s]["tta"][t] for q in labels if q.startswith("qsgd") and by[q, s]["tta"][t]]
                    if lb == "qsgd best":
                        value = min(qsgd) if qsgd else None
                        ratio = dense / value if dense and value else None
                    elif lb == "svd s=3 / qsgd best":
                        svd = by.get(("svd s=3", s), {}).get("tta", {}).get(t)
                        ratio = min(qsgd) / svd if qsgd and svd else None
                    else:
                        value = by[lb, s]["tta"][t]
                        ratio = dense / value if dense and value else None
                    if ratio is not None:
                        ratios.append(ratio)
                cell[lb] = (
                    (statistics.median(ratios), min(ratios), max(ratios), len(ratios))
                    if ratios
                    else (None, None, None, 0)
                )
            out[n][t] = cell
    return out


def _bar_lines(result: dict, sp: dict) -> list[str]:
    """Per worker count, the bar on the median cells: match (svd s=3 >= 2.7x over dense and >= 2x over the best
    qsgd at every target), beat (>= 4x and >= 2.4x at the highest), each met or missed with the figure that
    decides it. A cell is the median over the seeds where both runs reached the target (the table says when
    not all did); a target no seed reached counts as missed."""
    from services.bench.suite import BEAT_DENSE, BEAT_QSGD, MATCH_DENSE, MATCH_QSGD

    def verdict(cells: list, bar: float) -> str:
        values = [c[0] for c in cells]
        if any(v is None for v in values):
            return "**missed** (a target not reached)"
        low = min(values)
        text = f"{low:.2f}" if f"{low:.2f}" != f"{bar:.2f}" else f"{low:.4f}"  # 2.6996 is not 2.70
        return f"**{'met' if low >= bar else 'missed'}** (lowest {text}x, bar {bar:g}x)"

    lines = [
        f"svd s=3 at momentum {result['momentum']} (the paper's bar is set with momentum off; these runs use "
        "momentum) against dense and the best qsgd, the median cells above:",
        "",
    ]
    for n in result["workers"]:
        targets = sorted(sp[n], key=float)
        dense = [sp[n][t]["svd s=3"] for t in targets]
        qsgd = [sp[n][t]["svd s=3 / qsgd best"] for t in targets]
        lines.append(
            f"- {n} workers: match over dense {verdict(dense, MATCH_DENSE)}, over the best qsgd "
            f"{verdict(qsgd, MATCH_QSGD)}; beat at {100 * float(targets[-1]):.1f}% over dense "
            f"{verdict(dense[-1:], BEAT_DENSE)}, over the best qsgd {verdict(qsgd[-1:], BEAT_QSGD)}."
        )
    return lines


def _dense_comm_share(result: dict) -> dict[int, float | None]:
    """{workers: the median over dense's runs of (up + down) / step, from the mean virtual step's parts}."""
    out = {}
    for n in result["workers"]:
        shares = [
            (r["mean_parts"]["up_s"] + r["mean_parts"]["down_s"]) / r["mean_parts"]["step_s"]
            for r in result["runs"]
            if r["workers"] == n and r["label"] == "dense" and r["mean_parts"]["step_s"] > 0
        ]
        out[n] = statistics.median(shares) if shares else None
    return out


def _fmt_ratio(cell, seeds: int) -> str:
    """`median (lowest-highest)`, and how many of the seeds reached the target when not all did."""
    median, low, high, count = cell
    if median is None:
        return "-"
    spread = f" ({low:.2f}-{high:.2f})" if count > 1 else ""
    return f"{median:.2f}x{spread}" + (f", {count} of {seeds} seeds" if count < seeds else "")


def render(result: dict) -> str:
    """The markdown report of `table6.json`."""
    sp = speedups(result)
    link = result["link"]
    lines = [
        "# Table 6, simulated: speed-ups to accuracy targets with 8 and 16 workers",
        "",
        "Generated by `services/bench/simulate.py` from `table6.json`; do not edit by hand.",
        "",
        "Commands, run one after the other into the same results folder (a command keeps the runs already there): "
        + "; ".join(f"`{c['command']}` ({c['wall_s'] / 60:.1f} min)" for c in result["commands"])
        + f". The last started {result['started']} on {result['machine'].get('cpu')}, "
        f"{result['machine'].get('cores')} cores, commit {(result['machine'].get('git_commit') or '')[:10]}; "
        f"the simulated runs took {result['runs_wall_s'] / 60:.1f} min of wall time in all.",
        "",
        f"Model `{result['model']}` ({result['parameters']:,} parameters: VGG-11-BN at 5/16 width) on "
        f"`{result['dataset']}`, global batch {result['batch_size']} split over the workers, lr {result['lr']}, "
        f"momentum {result['momentum']}, cosine schedule, {result['steps']} steps, seeds {result['seeds']}, "
        f"an evaluation every {result['eval_every']} steps"
        + (f" on {result['test_size']:,} test images" if "test_size" in result else "")
        + ". Every simulated worker computes its real gradient "
        "on its own shard and encodes it with the real codec through the real per-layer policy; the PS's "
        "average is the real decode of those messages (exact training). The clock is virtual: compute and "
        f"encode from the cost table ({result['costs']['source']}, device {result['costs']['device']}), "
        "the PS's decode and update as measured while they ran, and the communication of every "
        f"{result['replay_every']}-th step replayed for real "
        + (
            f"over an emulated {link['bandwidth_mbit']:g} Mbit/s PS link (tc token bucket in network namespaces, "
            "no added latency: this kernel has no netem)"
            if link["emulated"]
            else f"over loopback ({link['reason']})"
        )
        + " by one sender process per worker; the other steps' communication from a line fitted to those "
        "replays. dense sends the model down; the others send the n messages (`atoms`). "
        f"topk's budget k = {result['topk_budget']} matches svd s=3's bytes; powersgd and topk are biased (error "
        "feedback).",
        "",
        "Targets, per worker count: "
        + "; ".join(f"{n} workers " + ", ".join(f"{100 * t:.1f}%" for t in ts) for n, ts in result["targets"].items())
        + " (3 points apart, the highest the best accuracy that every run of dense, svd and qsgd at that worker "
        "count reached; `-`: the codec did not reach the target in the steps run).",
        "",
    ]
    for n in result["workers"]:
        cols = list(next(iter(sp[n].values())))
        lines += [f"## Speed-up over dense to each target, {n} workers", ""]
        lines += ["| test accuracy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for t in reversed(list(sp[n])):
            lines.append(
                f"| {100 * float(t):.1f}% | "
                + " | ".join(_fmt_ratio(sp[n][t][c], len(result["seeds"])) for c in cols)
                + " |"
            )
        lines += [""]
    lines += [
        "Cells: dense's time to the target over the codec's, the median over seeds (lowest-highest), with how many "
        "seeds reached the target when not all did; `qsgd best`: the fastest of "
        "the qsgd bit widths run ("
        + (", ".join(sorted({r["label"] for r in result["runs"] if r["label"].startswith("qsgd")})) or "none")
        + ") per seed; `svd s=3 / qsgd best`: the best qsgd's time over svd s=3's.",
        "",
        "Dense's communication (up and down) as a share of its mean virtual step, the regime the bar asks for "
        "(>= 75%): "
        + "; ".join(
            f"{n} workers {100 * share:.0f}%" for n, share in _dense_comm_share(result).items() if share is not None
        )
        + ".",
        "",
        "## The paper's Table 6 bar",
        "",
        *_bar_lines(result, sp),
        "",
        "## Time to accuracy (virtual seconds) and the mean step",
        "",
    ]
    for n, targets in result["targets"].items():
        header = ["workers", "codec", "seed", "MB up/step", "MB down/step"]
        header += [f"to {100 * t:.1f}%" for t in targets]
        header += ["step (ms)", "worker", "up", "PS", "down", "apply", "best acc"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in (r for r in result["runs"] if str(r["workers"]) == n):
            p = r["mean_parts"]
            tta = [("-" if r["tta"][str(t)] is None else f"{r['tta'][str(t)]:.1f}") for t in targets]
            cells = [str(r["workers"]), r["label"], str(r["seed"])]
            cells += [f"{r['mean_bytes_up'] / 1e6:.2f}", f"{r['mean_bytes_down'] / 1e6:.2f}", *tta]
            cells += [f"{1e3 * p[k]:.1f}" for k in ("step_s", "worker_s", "up_s", "ps_s", "down_s", "apply_s")]
            cells += [f"{max(a for _, a in r['evals']):.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""]
    lines += ["", "## The links: replays and the fitted lines", ""]
    lines += [
        "| workers | direction | replays | overhead (ms) | rate (MB/s) | mean abs residual |",
        "|---|---|---|---|---|---|",
    ]
    for n, fits in result["link_fits"].items():
        for d, f in fits.items():
            rate = f["rate_bps"]
            rate_text = f"{rate / 1e6:.1f}" if math.isfinite(rate) else "not resolved"
            lines.append(
                f"| {n} | {d} | {f['samples']} | {1e3 * f['overhead_s']:.2f} | {rate_text} | "
                f"{100 * f['residual']:.1f}% |"
            )
    if link["emulated"]:
        lines += ["", f"Nominal rate: {link['bandwidth_mbit'] * 1e6 / 8 / 1e6:.1f} MB/s per direction.", ""]
    v = result.get("validation")
    lines += ["", "## The virtual clock against a real run", ""]
    if not v:
        lines += ["Not checked (--no-validate).", ""]
    elif "real_step_s" not in v:
        lines += [f"The check failed: {v['error']}", ""]
    else:
        lines += [
            f"A real PS and 2 worker processes ({v['codec']}, {v['steps']} steps, "
            f"{'the same emulated link' if v['emulated'] else 'loopback'}) against the virtual clock of the same "
            f"configuration: real {1e3 * v['real_step_s']:.1f} ms per step, virtual {1e3 * v['virtual_step_s']:.1f} "
            f"ms: error {100 * v['error']:+.1f}% (mean step time after the warm-up steps). The virtual step's "
            "parts: "
            + ", ".join(f"{k} {1e3 * x:.1f} ms" for k, x in v["virtual_parts"].items())
            + "; the real workers' own compute and encode: "
            + ", ".join(f"{k} {1e3 * x:.1f} ms" for k, x in v["real_worker_parts"].items())
            + " (the real run's 3 processes share this machine's cores). With the real workers' own compute and "
            f"encode in place of the table's, the virtual step is {1e3 * v['virtual_step_s_own_compute']:.1f} ms: "
            f"error {100 * v['error_own_compute']:+.1f}% (what is left is the clock's communication and PS parts).",
            "",
        ]
    return "\n".join(lines) + "\n"


def _workers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated worker counts, got {text!r}") from None
    if not values or any(not 1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError(f"worker counts must be 1 to 64, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    from services.common.argtypes import positive_float, positive_int

    p = argparse.ArgumentParser(prog="atomo bench table6", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=_workers, default=WORKERS, help="worker counts (default 8,16)")
    p.add_argument("--seeds", type=positive_int, help=f"seeds per codec and worker count (default {SEEDS}; --quick 1)")
    p.add_argument(
        "--first-seed", type=int, default=SEED, help="the first seed (default 0): runs already in --out are kept"
    )
    p.add_argument("--steps", type=positive_int, help=f"steps per run (default {STEPS}; --quick {QUICK_STEPS})")
    p.add_argument("--bandwidth", type=positive_float, default=BANDWIDTH_MBIT, metavar="MBIT", help="the PS link")
    p.add_argument("--codecs", help="only these labels or families, comma-separated ('dense,svd s=3,topk')")
    p.add_argument("--quick", action="store_true", help="dense and svd s=3, a few steps, a small test set")
    p.add_argument("--dataset", help=f"default {PREFERRED_DATASET} if installed, else {FALLBACK_DATASET}")
    p.add_argument("--costs", type=Path, help="a cost table JSON (device, compute_s {batch: s}, encode_s {label: s})")
    p.add_argument("--replay-every", type=positive_int, help=f"replay every N-th step (default {REPLAY_EVERY})")
    p.add_argument("--eval-every", type=positive_int, help=f"evaluate every N steps (default {EVAL_EVERY})")
    p.add_argument(
        "--test-size",
        type=positive_int,
        help=f"test images per evaluation (default {TEST_SIZE}, all of Fashion-MNIST's; --quick {QUICK_TEST_SIZE})",
    )
    p.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], help="accuracy targets (0-1)")
    p.add_argument("--no-netem", action="store_true", help="replay over loopback")
    p.add_argument("--no-validate", action="store_true", help="skip the check against a real 2-worker run")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/table6-<timestamp>)")
    p.add_argument("--report", type=Path, help=f"report (default {TABLE6_DOC}; --quick/--no-netem: <out>/report.md)")
    p.add_argument(
        "--report-from",
        type=Path,
        metavar="PATH",
        help=f"regenerate the report from a table6.json ({TABLE6_JSON}) or a results folder and exit",
    )
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.report_from is not None:
        return report_from(args.report_from, args.report)
    args.argv = list(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    args.replay_every = args.replay_every or (QUICK_REPLAY_EVERY if args.quick else REPLAY_EVERY)
    args.eval_every = args.eval_every or (QUICK_EVAL_EVERY if args.quick else EVAL_EVERY)
    args.validation_steps = QUICK_VALIDATION_STEPS if args.quick else VALIDATION_STEPS
    args.test_size = args.test_size or (QUICK_TEST_SIZE if args.quick else TEST_SIZE)
    args.seeds = args.seeds or (1 if args.quick else SEEDS)
    args.out = args.out or Path("bench/results") / time.strftime("table6-%Y%m%d-%H%M%S")
    run_experiment(args)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_receive":
        _receiver(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_send":
        _sender(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))
