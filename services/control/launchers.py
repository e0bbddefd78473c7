"""Launchers: start and stop a cluster (a PS and its workers) and report its PS control endpoint.

`LocalLauncher` runs them as processes on this machine; a Kubernetes launcher implements the same
`Launcher` interface with a PS Deployment and a worker StatefulSet. `ControlProcess` runs `atomo serve`
as a child process (for `atomo up`-like setups, the tests and the benchmark).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

import httpx


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

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    """A PS and `workers` worker processes on loopback (services.common.launch.LocalCluster)."""

    def __init__(self, state_dir: str | Path, workers: int = 2, **cluster_options):
        from services.common.launch import LocalCluster

        self.cluster = LocalCluster(state_dir, workers, **cluster_options)

    def start(self) -> str:
        self.cluster.start()
        return self.control_endpoint

    def stop(self) -> None:
        self.cluster.stop()

    @property
    def control_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.cluster.control_port}"
