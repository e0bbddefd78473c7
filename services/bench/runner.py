"""Running `atomo bench`'s cases: a PS and its workers per (network, worker count), one run per case, and the
results folder.

A group is one emulated network (services.bench.netem: hosts "ps", "worker-0", ..., and an unshaped "ctl")
or loopback, with one LocalCluster in it (each process started inside its host's namespace through
`Network.command`, the PS bound to its address there); the group's cases are submitted to that PS one after
another, as `atomo train` does with a comparison. Control traffic: the driver (this process) stays in the
host's own namespace, which has no route into the emulated network; a relay started in the "ctl" namespace
(`Network.forward`) carries the control client's ZeroMQ bytes from a Unix socket to the PS's control port,
so control requests cross the emulated network from "ctl" as a driver on that network would. The PS, the
workers and that relay each run inside a namespace; only the driver runs outside them. Each run directory at
the PS is a link to the case's folder, so the PS writes its records straight into the results.

Results folder (what services.bench.report reads):

    <out>/bench.json   {"command", "argv", "started", "finished" (ISO 8601 local times; finished null until done),
                        "machine": {cpu, cores, memory_gib, os, python, torch, pyzmq, git_commit},
                        "network": {"emulated", "reason", "latency_emulated", "latency_reason",
                                    "profiles": {name: {"bandwidth_mbit", "latency_ms"}}},
                        "headline_profile", "model", "dataset", "workers", "targets", "seeds", "eval_every",
                        "test_size", "main_codecs",
                        "load": {"start": load(), "end": load() (null until done), "warning": str or null},
                        "regime": {"dense_comm_share": {profile: share}, "paper_comm_share",
                                   "required_comm_share", "how"},
                        "lr_rule", "lrs": {label: lr}, "lrs_momentum_off": {label: lr},
                        "lrs_tried": {"<label> momentum <m>": [lr, ...] in the order run},
                        "bytes": {"comparable": {reference, reference_nbytes, budgets, nbytes},
                                  "message_nbytes": {label: mean bytes of one worker's message}},
                        "steps": {phase: steps}, "skipped": {label: why}, "phases": {phase: seconds},
                        "quick": bool}
    <out>/runs/<case_id>/case.json   {"case_id", "label", "family", "biased", "codec" (CodecSpec as JSON),
                        "profile" (name or "loopback"), "bandwidth_mbit", "latency_ms", "workers", "momentum",
                        "lr", "downlink", "phase" ("tune", "main", "momentum_off", "timing", "scale",
                        "downlink"), "steps", "seed", "eval_every", "state", "error", "wall_s" (submit to end,
                        seconds), "load" (load() at the run's end)}
    <out>/runs/<case_id>/spec.json, metrics.jsonl, summary.json, events.jsonl   written by the PS: one record
                        per step (wall_s, loss, bytes_up, bytes_down, compute_s, encode_s, communication_s,
                        decode_s, update_s, step_s; test_accuracy at evaluation steps)
    <out>/logs/<group>/   each process's log
    <out>/gradients.json  services.bench.gradients.run_study(out, quick)

`python -m services.bench.reduced <out> docs/benchmarks/bench.json` reduces a results folder to the one file
the report regenerates from (`atomo bench --report-from docs/benchmarks/bench.json`).

Measured and projected (services.bench.report): every time to accuracy at the headline profile, momentum on
and off, is measured end to end over the emulated link. A codec's time to accuracy at another profile is a
projection: the median steps to the target of its main runs at the headline profile times its mean step time
at that profile (its timing run there).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.bench.netem import LinkProfile, Network, NetworkUnavailable
from services.bench.suite import Case
from services.common.launch import ClusterError, LocalCluster
from services.common.ps_client import PSError, PSUnavailable
from services.report import summarize
from services.train import load_records as records

PS_PORT, CONTROL_PORT = 5555, 5556  # inside the PS's own namespace, so always free
NETWORK_NAME = "atomo-bench"
CONTROL_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 120.0  # on top of TIMEOUT_PER_STEP_S per step
TIMEOUT_PER_STEP_S = 3.0
CANCEL_TIMEOUT_S = 30.0  # for a timed-out run to end once cancelled
WARMUP_STEPS = 5  # records before this step are left out of step-time statistics (first-step allocations)


class Group:
    """A PS and `workers` workers over `link` (None: loopback); runs cases one after another."""

    def __init__(self, out: Path, profile: str, link: LinkProfile | None, workers: int):
        self.out, self.profile, self.link, self.workers = out, profile, link, workers
        self.name = f"{profile}-w{workers}"
        self.state_dir = out / ".ps-state" / self.name
        self.network: Network | None = None
        self.cluster: LocalCluster | None = None
        self._socket_dir: str | None = None

    def start(self) -> Group:
        hosts = ["ps", *(f"worker-{i}" for i in range(self.workers))]
        options: dict = {}
        try:
            if self.link is not None:
                self.network = Network(hosts, self.link, name=NETWORK_NAME, unshaped=["ctl"]).start()
                ps = self.network.address("ps")
                self._socket_dir = tempfile.mkdtemp(prefix="atomo-bench-")  # short: a Unix socket path <= 107
                endpoint = self.network.forward("ctl", Path(self._socket_dir) / "control.sock", ps, CONTROL_PORT)
                options = dict(
                    ps_args=("--allow-remote-without-keys",),  # the network exists only in our namespaces
                    bind_host=ps,
                    ps_host=ps,
                    control_endpoint=endpoint,
                    wrap=self.network.command,
                    port=PS_PORT,
                    control_port=CONTROL_PORT,
                )
            self.cluster = LocalCluster(
                self.state_dir, self.workers, log_dir=self.out / "logs" / self.name, metrics=False, **options
            )
            self.cluster.start()
        except BaseException:
            self.close()
            raise
        return self

    def alive(self) -> bool:
        cluster = self.cluster
        return cluster is not None and all(p.poll() is None for p in [cluster.ps, *cluster.workers.values()])

    def run(self, case: Case) -> dict:
        """Run `case` to its end; write and return its case.json. A failed run (or a failed restart of the
        group's processes) is recorded, not raised."""
        if not self.alive():
            self.close()
            started = time.monotonic()
            try:
                self.start()
            except (ClusterError, NetworkUnavailable) as exc:
                return write_case(self.out, case, "failed", f"{type(exc).__name__}: {exc}", time.monotonic() - started)
        folder = self.out / "runs" / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        spec = case.run_spec()
        (folder / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
        link = self.state_dir / "runs" / case.case_id
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(folder.resolve(), target_is_directory=True)
        started = time.monotonic()
        try:
            self.cluster.client(timeout_s=CONTROL_TIMEOUT_S).submit(case.case_id, spec.model_dump(mode="json"))
            run = self.cluster.wait_for_run(case.case_id, RUN_TIMEOUT_S + TIMEOUT_PER_STEP_S * case.steps)
            state, error = run["state"], run.get("error")
        except (ClusterError, PSError, PSUnavailable) as exc:
            state, error = "failed", f"{type(exc).__name__}: {exc}"
            self._end(case.case_id)
        return write_case(self.out, case, state, error, time.monotonic() - started)

    def _end(self, run_id: str) -> None:
        """After a failed wait: cancel `run_id` at the PS and wait for it to end, so that the next case is not
        refused (the PS serves one run at a time); if that fails too, stop the group (the next run restarts it)."""
        if self.cluster is None:
            return
        try:
            self.cluster.client(timeout_s=CONTROL_TIMEOUT_S).cancel(run_id)
            self.cluster.wait_for_run(run_id, CANCEL_TIMEOUT_S)
        except (ClusterError, PSError, PSUnavailable):
            self.close()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.network is not None:
            self.network.close()
            self.network = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        shutil.rmtree(self.state_dir, ignore_errors=True)  # its run directories are only links

    def __enter__(self) -> Group:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def write_case(out: Path, case: Case, state: str, error: str | None, wall_s: float) -> dict:
    """Write and return `case`'s case.json with its outcome."""
    folder = out / "runs" / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    record = {**case.record(), "state": state, "error": error, "wall_s": wall_s, "load": load()}
    (folder / "case.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


# -- reading results ---------------------------------------------------------------------------------------------


def median_timing(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get("step", 0) >= WARMUP_STEPS and r.get(key) is not None]
    return statistics.median(values) if values else None


def comm_share(folder: Path) -> float | None:
    """The median over a run's steps (after the warm-up) of communication_s / (compute_s + encode_s +
    communication_s): communication's share of a worker's step."""
    shares = []
    for r in records(folder):
        parts = [r.get(k) for k in ("compute_s", "encode_s", "communication_s")]
        if r.get("step", 0) >= WARMUP_STEPS and all(isinstance(v, (int, float)) for v in parts) and sum(parts) > 0:
            shares.append(parts[2] / sum(parts))
    return statistics.median(shares) if shares else None


def load() -> dict:
    """The machine's load now: os.getloadavg() (1, 5 and 15 minutes) and the CPU count."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return {"load_1m": None, "load_5m": None, "load_15m": None, "cpus": os.cpu_count()}
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2), "cpus": os.cpu_count()}


def high_load(sample: dict, share: float = 0.5) -> bool:
    """Whether a load sample taken before our processes start shows the CPUs busy: the 1-minute load at least
    `share` of the CPU count (other work would then slow and distort the measured steps)."""
    return sample.get("load_1m") is not None and sample["load_1m"] >= share * (sample.get("cpus") or 1)


def final_accuracy(folder: Path) -> float | None:
    return summarize(records(folder))["final_test_accuracy"]


# -- the machine -------------------------------------------------------------------------------------------------


def machine() -> dict:
    """What ran the benchmark: CPU model, cores, memory, OS, Python, torch, pyzmq and the git commit."""
    import torch
    import zmq

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory_gib = round(kib / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "git_commit": commit or None,
    }
