"""A local cluster: one PS and N worker processes on loopback (`atomo train`, `atomo up`, the tests).

Each process is `python -m services ps|worker ...` with its output in `<log_dir>/<name>.log` (folder 0700,
files 0600: see services/common/files.py). The PS picks
free ports itself and prints them on a ready line, which `start()` reads; it then waits until every worker
has registered (through the PS's control port). Metrics ports are chosen before anything starts (a base
port and the next ones, or free ports), so they are known and printable in advance (`metrics_ports`).

Children die with their launcher: each child gets the read end of a pipe whose write end only the launching
process holds (`ATOMO_PARENT_FD`); `watch_parent()`, called first thing by `atomo ps` and `atomo worker`,
stops the child gracefully when that pipe reports end of file (its parent is gone, however it died) and
exits it hard after a grace period. Unlike a parent-death signal this does not depend on which thread
spawned the child.

Elsewhere than loopback (`atomo bench` puts each process in its own network namespace): `bind_host` is the
PS's `--bind`, `ps_host` the address the workers connect to, `control_endpoint` the control client's endpoint
(by default tcp://ps_host:control_port), `wrap(name, argv)` the command that runs process `name`'s argv
(e.g. `Network.command`, which runs it inside that host's namespace), and `port`/`control_port` the PS's
ports (0: the PS picks free ones).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from services.common.files import open_private, private_dir
from services.common.ps_client import PSClient, PSUnavailable

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0  # interpreter shutdown with torch loaded takes seconds on a busy machine
PARENT_FD_ENV = "ATOMO_PARENT_FD"
PARENT_GRACE_S = 5.0  # after the parent is gone: this long to stop gracefully (checkpoint), then a hard exit


def watch_parent(grace_s: float = PARENT_GRACE_S) -> None:
    """If started by a LocalCluster: stop this process (SIGTERM to itself) when the launcher is gone, and
    exit it hard `grace_s` later if it has not ended by then. A no-op for processes started otherwise."""
    value = os.environ.pop(PARENT_FD_ENV, None)  # popped: a grandchild must not watch an fd it lacks
    if not value or not value.isdigit():
        return
    fd = int(value)

    def watch() -> None:
        try:
            while os.read(fd, 64):  # the parent never writes: this returns b"" once its end is closed
                pass
        except OSError:
            return  # not the pipe we were given: watch nothing rather than stop a healthy process
        print("the launching process is gone: stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ClusterError(RuntimeError):
    """A process of the local cluster did not start or exited early; the message quotes its log."""


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file (empty if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalCluster:
    """Start a PS (`ps_args` appended to its command) and `workers` workers; `stop()` ends them all.

    `threads`: torch threads per process (default: the cores shared out, at least one each).
    `keys`: a CURVE key directory (`atomo keys`): the PS serves with it, and every worker and this launcher's
    control client use its client key `key_name`.
    `bind_host`, `ps_host`, `control_endpoint`, `wrap`, `port`, `control_port`: see the module docstring.
    `metrics`: serve Prometheus metrics from every process, on `metrics_base` (the PS) and the ports after it
    (worker i on `metrics_base + 1 + i`), or on free ports chosen now when `metrics_base` is 0.
    """

    def __init__(
        self,
        state_dir: str | Path,
        workers: int = 2,
        log_dir: str | Path | None = None,
        ps_args: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
        threads: int | None = None,
        heartbeat_s: float = 1.0,
        metrics: bool = True,
        env: dict[str, str] | None = None,
        keys: str | Path | None = None,
        key_name: str = "client-0",
        metrics_base: int = 0,
        bind_host: str = "127.0.0.1",
        ps_host: str = "127.0.0.1",
        control_endpoint: str | None = None,
        wrap: Callable[[str, list[str]], list[str]] | None = None,
        port: int = 0,
        control_port: int = 0,
    ):
        self.state_dir = Path(state_dir)
        self.log_dir = Path(log_dir) if log_dir is not None else self.state_dir / "logs"
        self.num_workers = workers
        self.ps_args = tuple(ps_args)
        self.worker_args = tuple(worker_args)
        self.threads = threads or max(1, (os.cpu_count() or 1) // (workers + 1))
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.keys = Path(keys) if keys is not None else None
        self.key_name = key_name
        self.ps: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.ready: dict = {}
        self.port = port
        self.control_port = control_port
        self.bind_host = bind_host
        self.ps_host = ps_host
        self.control_endpoint = control_endpoint
        self.wrap = wrap
        names = ["ps", *(f"worker-{i}" for i in range(workers))]
        self.metrics_ports: dict[str, int] = {}
        if metrics:
            ports = [metrics_base + i for i in range(len(names))] if metrics_base else [free_port() for _ in names]
            self.metrics_ports = dict(zip(names, ports, strict=True))
        self._parent_read, self._parent_write = os.pipe()  # children watch the read end (watch_parent)

    # -- processes -------------------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        private_dir(self.log_dir)
        log = open_private(self.log_dir / f"{name}.log", "ab")  # the child owns it from here
        env = {**self.env, PARENT_FD_ENV: str(self._parent_read)}
        argv = [sys.executable, "-m", "services", *args]
        try:
            return subprocess.Popen(
                self.wrap(name, argv) if self.wrap is not None else argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(self._parent_read,),
            )
        finally:
            log.close()

    def start_ps(self, timeout_s: float = READY_TIMEOUT_S) -> dict:
        """Start the PS (on the ports of the previous PS, if any) and return its ready line."""
        args = [
            "ps",
            "--bind",
            self.bind_host,
            "--port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            "--state-dir",
            str(self.state_dir),
            "--heartbeat-s",
            str(self.heartbeat_s),
            "--threads",
            str(self.threads),
            *(["--metrics-port", str(self.metrics_ports["ps"])] if self.metrics else []),
            *(["--keys", str(self.keys)] if self.keys else []),
            *self.ps_args,
        ]
        log = self.log_dir / "ps.log"
        offset = log.stat().st_size if log.exists() else 0
        self.ps = self._spawn("ps", args)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = self._ready_line(log, offset)
            if ready is not None:
                self.ready = ready
                self.port, self.control_port = ready["port"], ready["control_port"]
                return ready
            if self.ps.poll() is not None:
                raise ClusterError(f"the PS exited with status {self.ps.returncode}:\n{log_tail(log)}")
            time.sleep(0.05)
        raise ClusterError(f"the PS was not ready within {timeout_s:.0f} s:\n{log_tail(log)}")

    @staticmethod
    def _ready_line(log: Path, offset: int) -> dict | None:
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                for line in f:
                    if line.startswith(b'{"ready"'):
                        return json.loads(line)
        except (OSError, ValueError):
            return None
        return None

    def start_worker(self, worker_id: str) -> subprocess.Popen:
        args = [
            "worker",
            "--ps",
            f"tcp://{self.ps_host}:{self.port}",
            "--id",
            worker_id,
            "--heartbeat-s",
            str(self.heartbeat_s),
            "--threads",
            str(self.threads),
            *(["--metrics-port", str(self.metrics_ports[worker_id])] if worker_id in self.metrics_ports else []),
            *(["--keys", str(self.keys), "--key-name", self.key_name] if self.keys else []),
            *self.worker_args,
        ]
        self.workers[worker_id] = self._spawn(worker_id, args)
        return self.workers[worker_id]

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> LocalCluster:
        """Start the PS and the workers; return once every worker has registered."""
        self.start_ps(timeout_s)
        for i in range(self.num_workers):
            self.start_worker(f"worker-{i}")
        self.wait_for_workers(self.num_workers, timeout_s)
        return self

    def client(self, timeout_s: float = 5.0) -> PSClient:
        from services.common.transport import CurveKeys  # torch comes with it: only where keys are used

        curve = CurveKeys.load(self.keys, "client", self.key_name) if self.keys else None
        endpoint = self.control_endpoint or f"tcp://{self.ps_host}:{self.control_port}"
        return PSClient(endpoint, timeout_s=timeout_s, curve=curve)

    def wait_for_workers(self, count: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for worker_id, proc in self.workers.items():
                if proc.poll() is not None:
                    log = log_tail(self.log_dir / f"{worker_id}.log")
                    raise ClusterError(f"worker {worker_id} exited with status {proc.returncode}:\n{log}")
            try:
                workers = self.client().status()["workers"]
            except PSUnavailable:
                workers = []
            if sum(w["state"] != "lost" for w in workers) >= count:
                return
            time.sleep(0.1)
        raise ClusterError(f"fewer than {count} workers registered within {timeout_s:.0f} s")

    def wait_for_run(self, run_id: str, timeout_s: float) -> dict:
        """Wait until run `run_id` ends at the PS; return its run object (from summary.json if the PS has
        exited, as with --exit-after-run)."""
        summary = self.state_dir / "runs" / run_id / "summary.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ps is not None and self.ps.poll() is not None:
                if summary.exists():
                    return json.loads(summary.read_text())
                raise ClusterError(
                    f"the PS exited with status {self.ps.returncode}:\n{log_tail(self.log_dir / 'ps.log')}"
                )
            try:
                status = self.client().status()
            except PSUnavailable:
                status = {}
            run = status.get("run") or {}
            if run.get("run_id") == run_id and run.get("state") in ("succeeded", "failed", "cancelled"):
                return run
            time.sleep(0.2)
        raise ClusterError(f"run {run_id} did not end within {timeout_s:.0f} s")

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM every process, then SIGKILL what is still running after a grace period."""
        procs = [*self.workers.values(), *([self.ps] if self.ps is not None else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
