"""Launchers: start and stop a cluster (a PS and its workers) and report its PS control endpoint.

`LocalLauncher` runs them as processes on this machine and, with `supervise` (`atomo up`), keeps them up:
- the PS: if its process dies, it reports that at once (`ps_process()`, `drain_events()`, which the control
  service's scheduler reads), restarts the PS on the same ports (it resumes its unfinished run from the
  checkpoint and the workers register again), and after `crash_loop_limit` deaths during the same run marks
  that run failed in the PS's state directory, so that the restarted PS does not resume it again;
- a hung PS (liveness): the PS's control port is pinged every few seconds; a PS that has not answered for
  `liveness_timeout_s` is killed (SIGKILL) and then handled as a PS that died;
- the workers: a worker process that exits is restarted with the same id and arguments (it registers again
  and takes a free shard); one that keeps dying is restarted after a delay that doubles up to 10 s, reset
  once it has stayed up for a minute.
A Kubernetes launcher implements the same `Launcher` interface with a PS Deployment and a worker StatefulSet
(Kubernetes restarts their containers). `ControlProcess` runs `atomo serve` as a child process (for
`atomo up`-like setups, the tests and the benchmark).
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

import httpx

from services.common.launch import ClusterError, LocalCluster, free_port, log_tail
from services.common.ps_client import PSUnavailable

log = logging.getLogger("atomo.control")

CRASH_LOOP_LIMIT = 3  # PS deaths during one run before that run is failed instead of resumed again
SUPERVISE_INTERVAL_S = 0.2
LOG_TAIL_LINES = 20
MAX_BACKOFF_S = 10.0  # the longest wait before restarting a process that keeps dying
WORKER_STABLE_S = 60.0  # a worker up this long is restarted at once the next time it dies
LIVENESS_TIMEOUT_S = 60.0  # a PS whose control port has not answered this long is hung: killed and restarted
LIVENESS_PING_S = 5.0  # the most time between two pings (and the timeout of one)


class Launcher(ABC):
    """A cluster's lifecycle, whatever runs it."""

    @abstractmethod
    def start(self) -> str:
        """Start the PS and its workers; return the PS control endpoint (e.g. "tcp://127.0.0.1:5556")."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the workers and the PS; idempotent."""

    @property
    @abstractmethod
    def control_endpoint(self) -> str:
        """The PS control endpoint of the started cluster."""

    def ps_process(self) -> dict | None:
        """The PS process as this launcher sees it (`state` "up" or "down", `pid`, `restarts`, and when down
        `exit_status`, `since` and `log_tail`); None when this launcher does not watch the PS process."""
        return None

    def drain_events(self) -> list[dict]:
        """What happened to the cluster's processes since the last call, oldest first: `{"type": "ps_exited",
        "exit_status", "cause", "log_tail", "run_id", "deaths", "run_failed"}`, `{"type": "ps_restarted",
        "pid", "restarts"}`, `{"type": "worker_exited", "worker", "exit_status", "log_tail", "restart_in_s"}`
        or `{"type": "worker_restarted", "worker", "pid", "restarts"}`; empty when this launcher does not
        watch the processes."""
        return []

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ControlProcess:
    """`atomo serve` in a child process on loopback; `start()` waits until /healthz answers."""

    def __init__(
        self,
        db_path: str | Path,
        ps_endpoint: str,
        token: str | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: str | Path | None = None,
    ):
        self.db_path, self.ps_endpoint, self.token = str(db_path), ps_endpoint, token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> ControlProcess:
        env = dict(os.environ)
        env.pop("ATOMO_API_TOKEN", None)
        if self.token is not None:
            env["ATOMO_API_TOKEN"] = self.token
        cmd = [sys.executable, "-m", "services", "serve", "--port", str(self.port), "--db", self.db_path]
        cmd += ["--ps", self.ps_endpoint, "--log-level", "warning", *self.extra_args]
        if self.log_path:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        else:
            self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"atomo serve exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"atomo serve did not answer on {self.url} within {timeout_s} s")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (graceful) or SIGKILL (a crash), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill() if kill else self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LocalLauncher(Launcher):
    """A PS and `workers` worker processes on loopback (services.common.launch.LocalCluster).

    With `supervise`, a thread watches the PS and the workers and restarts them (see the module's doc);
    `liveness_timeout_s` is how long the PS may leave its control port unanswered before it is killed.
    """

    def __init__(
        self,
        state_dir: str | Path,
        workers: int = 2,
        supervise: bool = False,
        crash_loop_limit: int = CRASH_LOOP_LIMIT,
        liveness_timeout_s: float = LIVENESS_TIMEOUT_S,
        **cluster_options,
    ):
        self.cluster = LocalCluster(state_dir, workers, **cluster_options)
        self.supervise = supervise
        self.crash_loop_limit = crash_loop_limit
        self.liveness_timeout_s = liveness_timeout_s
        self.restarts = 0
        self.worker_restarts: collections.Counter[str] = collections.Counter()
        self._down: dict | None = None  # exit_status, cause, since, log_tail while the PS is down
        self._deaths: collections.Counter[str] = collections.Counter()  # PS deaths by the run it was serving
        self._events: collections.deque[dict] = collections.deque(maxlen=1000)
        self._lock = threading.Lock()  # one of start_ps/start_worker/stop at a time
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._answered = time.monotonic()  # when the PS last answered a ping
        self._pinged = 0.0
        self._killed_hung: str | None = None  # why the supervisor killed the PS, until its exit is reported
        self._worker_down: dict[str, float] = {}  # exited worker -> when to restart it (monotonic)
        self._worker_backoff: dict[str, float] = {}  # worker -> the delay before its last restart
        self._worker_up: dict[str, float] = {}  # worker -> when its process was started, monotonic

    def start(self) -> str:
        self.cluster.start()
        if self.supervise:
            now = time.monotonic()
            self._answered = now
            self._worker_up = dict.fromkeys(self.cluster.workers, now)
            self._thread = threading.Thread(target=self._supervise, name="cluster-supervisor", daemon=True)
            self._thread.start()
        return self.control_endpoint

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self.cluster.stop()

    @property
    def control_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.cluster.control_port}"

    def ps_process(self) -> dict | None:
        if not self.supervise:
            return None
        ps, down = self.cluster.ps, self._down
        state = {"state": "down" if down else "up", "pid": None if down or ps is None else ps.pid}
        return state | {"restarts": self.restarts} | (down or {})

    def drain_events(self) -> list[dict]:
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    # -- supervision -----------------------------------------------------------------------------------------

    def _supervise(self) -> None:
        backoff = 0.0
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            ps = self.cluster.ps
            if ps is not None and ps.poll() is None:
                backoff = 0.0
                self._check_liveness(ps)
            if ps is not None and ps.poll() is not None:
                self._on_exit(ps.returncode)
                self._stopping.wait(backoff)  # a PS that dies again at once is restarted more slowly each time
                backoff = min(MAX_BACKOFF_S, 2 * backoff or 1.0)
                self._restart()
            self._supervise_workers()

    def _check_liveness(self, ps: subprocess.Popen) -> None:
        """Ping the PS's control port now and then; kill a PS that has not answered for liveness_timeout_s
        (its loop is stuck: the next pass restarts it like a PS that died)."""
        now = time.monotonic()
        if now - self._pinged < min(LIVENESS_PING_S, self.liveness_timeout_s / 4):
            return
        self._pinged = now
        try:
            self.cluster.client(timeout_s=min(LIVENESS_PING_S, self.liveness_timeout_s / 2)).ping()
            self._answered = time.monotonic()
            return
        except PSUnavailable:
            pass
        silent = time.monotonic() - self._answered
        if silent > self.liveness_timeout_s:
            self._killed_hung = (
                f"hung: its control port did not answer for {silent:.0f} s (liveness timeout "
                f"{self.liveness_timeout_s:g} s); killed by the supervisor"
            )
            log.error("the PS (pid %d) is %s", ps.pid, self._killed_hung)
            ps.kill()
            ps.wait()

    def _on_exit(self, status: int) -> None:
        """The PS exited: say so, count it against the run it was serving, fail that run if it crash-loops."""
        tail = log_tail(self.cluster.log_dir / "ps.log", LOG_TAIL_LINES)
        cause, self._killed_hung = self._killed_hung or f"exited with status {status}", None
        self._down = {"exit_status": status, "cause": cause, "since": time.time(), "log_tail": tail}
        run_id = self._unfinished_run()
        deaths = 0
        failed = False
        if run_id is not None:
            self._deaths[run_id] += 1
            deaths = self._deaths[run_id]
            failed = deaths >= self.crash_loop_limit
            if failed:
                self._fail_run(run_id, deaths, tail)
        log.error("the PS %s (run %s, death %d)", cause, run_id, deaths)
        self._events.append(
            {"type": "ps_exited", "exit_status": status, "cause": cause, "log_tail": tail, "run_id": run_id}
            | {"deaths": deaths, "run_failed": failed}
        )

    def _unfinished_run(self) -> str | None:
        """The run a restarted PS would resume: the newest one in its state directory without a summary."""
        from services.ps.rundir import scan_runs

        _, unfinished = scan_runs(self.cluster.state_dir)
        return unfinished[-1] if unfinished else None

    def _fail_run(self, run_id: str, deaths: int, tail: str) -> None:
        """Write the run's final summary as failed: a PS never resumes a run that has one."""
        from services.ps.rundir import RunDirectory

        error = f"the PS died {deaths} times during this run (a crash loop); the end of its log:\n{tail}"
        summary = {"run_id": run_id, "state": "failed", "error": error}
        RunDirectory(self.cluster.state_dir, run_id).write_summary(summary)

    def _restart(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            try:
                self.cluster.start_ps()
            except ClusterError as exc:  # it died again while starting: the next pass counts that death
                log.error("the PS did not restart: %s", exc)
                return
        self.restarts += 1
        self._down = None
        self._answered = time.monotonic()
        self._events.append({"type": "ps_restarted", "pid": self.cluster.ps.pid, "restarts": self.restarts})

    def _supervise_workers(self) -> None:
        """Restart every worker process that exited: at once if it had been up for WORKER_STABLE_S, else after
        a delay that doubles with each quick death (up to MAX_BACKOFF_S)."""
        now = time.monotonic()
        for worker_id, proc in list(self.cluster.workers.items()):
            if proc.poll() is None:
                continue
            if worker_id not in self._worker_down:
                quick = now - self._worker_up.get(worker_id, now) < WORKER_STABLE_S
                backoff = min(MAX_BACKOFF_S, 2 * self._worker_backoff.get(worker_id, 0.0) or 1.0) if quick else 0.0
                self._worker_backoff[worker_id] = backoff
                self._worker_down[worker_id] = now + backoff
                tail = log_tail(self.cluster.log_dir / f"{worker_id}.log", LOG_TAIL_LINES)
                log.error("worker %s exited with status %s: restarting in %.0f s", worker_id, proc.returncode, backoff)
                self._events.append(
                    {"type": "worker_exited", "worker": worker_id, "exit_status": proc.returncode}
                    | {"log_tail": tail, "restart_in_s": backoff}
                )
            if now < self._worker_down[worker_id]:
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                restarted = self.cluster.start_worker(worker_id)
            del self._worker_down[worker_id]
            self._worker_up[worker_id] = time.monotonic()
            self.worker_restarts[worker_id] += 1
            self._events.append(
                {"type": "worker_restarted", "worker": worker_id, "pid": restarted.pid}
                | {"restarts": self.worker_restarts[worker_id]}
            )
