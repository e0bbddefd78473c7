"""Emulated networks: hosts in their own network namespaces behind bandwidth- and latency-limited links.

Layout (root and iproute2 needed; nothing is added to the host's own network namespace):

    ns <prefix>-ps --- eth0 ==veth== h0 ---+
    ns <prefix>-w0 --- eth0 ==veth== h1 ---+-- br0   (ns <prefix>-bridge)
    ns <prefix>-ctl -- eth0 ==veth== h2 ---+

Each host gets its own namespace, with `lo` up and one interface `eth0` holding a private address from
10.231.0.0/24 (host i has 10.231.0.(i+1)); the other end of its veth pair sits in a namespace of its own
that holds the bridge `br0`. The addresses exist only inside those namespaces, so two networks (two runs)
may use the same ones without meeting.

Shaping, on every shaped host's link and in both directions: the host-side `eth0`'s egress is the host's
upload, the bridge-side `h<i>`'s egress its download. Each direction has a token bucket (tbf) that limits
the rate to the profile's bandwidth (a queue of about 50 ms, at least 128 KiB) and, where the kernel has the
netem qdisc, a netem qdisc above it that delays every packet by half the profile's latency. So `latency_ms`
is the one-way latency between two shaped hosts (half on the sender's upload, half on the receiver's
download) and the round-trip time between them is twice it. A kernel built without netem (this project's
development machine is one: `latency_unavailable()` says so) gets the bandwidth limit only, no added latency;
`Network.latency_emulated` records which, and the benchmark reports it.
Every host's link has the full bandwidth: the PS's link is shared by all workers, as on a real PS (what
they send together goes through its one download). Hosts named in `unshaped` (a driver, "ctl", for control
traffic) have a link without qdiscs; their traffic to a shaped host still crosses that host's link.

Names carry a unique prefix, `<name>-<pid>-<n>`: two runs, or two networks of one process, never collide.
Tear-down (`close`) kills the processes still running in the namespaces (SIGTERM, then SIGKILL after
`KILL_GRACE_S`), then deletes the namespaces, which removes the veths and their qdiscs. It runs on leaving
the `with` block whatever happened, at interpreter exit (atexit), and on SIGINT/SIGTERM (handlers installed
while a network is up, from the main thread, which tear down and then pass the signal on to the previous
handler). A process killed with SIGKILL can run none of these: the next network with the same `name`
sweeps the namespaces whose owner pid is gone (`sweep`, also `python -m services.bench.netem sweep NAME`).

`forward()` relays a Unix socket (a path: not bound to any network namespace) to a TCP port inside the
emulated network, from a process run in one of its hosts: a process outside the network (a benchmark
driver) reaches a server inside it, its traffic crossing the emulated links from that host.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.231.0"  # a private /24, used only inside the namespaces a Network creates
PREFIX_LEN = 24
INTERFACE = "eth0"  # every host's interface inside its namespace
BRIDGE = "br0"
QUEUE_S = 0.05  # the token bucket's queue, in seconds at the link's rate
MIN_QUEUE_BYTES = 128 * 1024
MIN_BURST_BYTES = 16 * 1024
KILL_GRACE_S = 3.0
COMMAND_TIMEOUT_S = 30.0
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# What a token bucket on a veth can emulate sensibly: 10 kbit/s (slower, a run only times out) to 100 Gbit/s
# (faster than a veth moves; tbf's burst, derived from the rate, must fit an int), and at most 10 s of latency.
MIN_BANDWIDTH_MBIT, MAX_BANDWIDTH_MBIT = 0.01, 100_000.0
MAX_LATENCY_MS = 10_000.0


@dataclass(frozen=True)
class LinkProfile:
    """One host's link: `bandwidth_mbit` in each direction (Mbit/s, 10^6 bit/s) and `latency_ms`, the one-way
    latency between two hosts (half of it on each host's link)."""

    bandwidth_mbit: float
    latency_ms: float

    def __post_init__(self) -> None:
        if not self.bandwidth_mbit > 0:
            raise ValueError(f"bandwidth_mbit must be positive, got {self.bandwidth_mbit!r}")
        if not MIN_BANDWIDTH_MBIT <= self.bandwidth_mbit <= MAX_BANDWIDTH_MBIT:
            raise ValueError(
                f"bandwidth_mbit must be from {MIN_BANDWIDTH_MBIT:g} to {MAX_BANDWIDTH_MBIT:g}, "
                f"got {self.bandwidth_mbit!r}"
            )
        if not self.latency_ms >= 0:
            raise ValueError(f"latency_ms must be zero or positive, got {self.latency_ms!r}")
        if not self.latency_ms <= MAX_LATENCY_MS:
            raise ValueError(f"latency_ms must be from 0 to {MAX_LATENCY_MS:g}, got {self.latency_ms!r}")

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_mbit * 1e6 / 8


PROFILES: dict[str, LinkProfile] = {
    "1gbit": LinkProfile(1000, 0.2),
    "100mbit": LinkProfile(100, 1.0),
    "edge": LinkProfile(20, 10.0),
}


class NetworkUnavailable(RuntimeError):
    """Network emulation cannot work here (the message says why) or setting a network up failed."""


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and result.returncode != 0:
        raise NetworkUnavailable(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _namespaces() -> list[str]:
    """The names of the existing named network namespaces."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM every process in `namespace` (never this one), SIGKILL those left after `grace_s`."""

    def pids() -> list[int]:
        out = _run(["ip", "netns", "pids", namespace], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        left = pids()
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_pid_alive(p) for p in left):
            time.sleep(0.05)


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    _run(["ip", "netns", "delete", namespace], check=False)


# -- tear-down on exit and on signals ---------------------------------------------------------------------------

_ACTIVE: list[Network] = []
_PREVIOUS_HANDLERS: dict[int, object] = {}
_LOCK = threading.RLock()
_SEQUENCE = itertools.count()


def _close_all() -> None:
    for network in list(_ACTIVE):
        network.close()


def _on_signal(signum: int, frame) -> None:
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    _close_all()  # also restores the previous handlers (the last network closed)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _register(network: Network) -> None:
    with _LOCK:
        _ACTIVE.append(network)
        if len(_ACTIVE) == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                _PREVIOUS_HANDLERS[signum] = signal.signal(signum, _on_signal)


def _unregister(network: Network) -> None:
    with _LOCK:
        if network in _ACTIVE:
            _ACTIVE.remove(network)
        if not _ACTIVE and threading.current_thread() is threading.main_thread():
            for signum, handler in _PREVIOUS_HANDLERS.items():
                if signal.getsignal(signum) is _on_signal:
                    signal.signal(signum, handler)
            _PREVIOUS_HANDLERS.clear()


atexit.register(_close_all)


# -- the network ------------------------------------------------------------------------------------------------


class Network:
    """An emulated network of `hosts` (names), every link shaped to `profile` except those of `unshaped`
    hosts. A context manager: `with Network(["ps", "w0"], PROFILES["100mbit"]) as net: ...`."""

    _probed: tuple[str | None, str | None] | None = None  # (check(), latency_unavailable()), probed once

    def __init__(
        self,
        hosts: Sequence[str],
        profile: LinkProfile,
        name: str = "atomo-net",
        unshaped: Sequence[str] = (),
    ):
        hosts, unshaped = list(hosts), list(unshaped)
        every = hosts + unshaped
        if not hosts:
            raise ValueError("a network needs at least one host")
        for host in every:
            if not isinstance(host, str) or not HOST_NAME.fullmatch(host) or host == "bridge":
                raise ValueError(f"host name {host!r} must be 1-64 letters, digits, '_', '.' or '-' (not 'bridge')")
        if len(set(every)) != len(every):
            raise ValueError(f"host names must be distinct, got {every}")
        if len(every) > 253:
            raise ValueError(f"at most 253 hosts fit in {SUBNET}.0/{PREFIX_LEN}, got {len(every)}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", name):
            raise ValueError(f"network name {name!r} must be a letter then up to 31 letters, digits, '_' or '-'")
        if not isinstance(profile, LinkProfile):
            raise TypeError(f"profile must be a LinkProfile, got {type(profile).__name__}")
        self.name = name
        self.profile = profile
        self.hosts = every
        self.shaped = set(hosts)
        self.prefix = f"{name}-{os.getpid()}-{next(_SEQUENCE)}"
        self._created: list[str] = []
        self._forwards: list[tuple[subprocess.Popen, Path]] = []
        self._up = False
        self.latency_emulated = False  # set by start(): whether the kernel has netem

    # -- where things are ---------------------------------------------------------------------------------------

    def _index(self, host: str) -> int:
        try:
            return self.hosts.index(host)
        except ValueError:
            raise KeyError(f"no host {host!r} in this network (hosts: {self.hosts})") from None

    def namespace(self, host: str) -> str:
        """The network namespace of `host` (`ip netns exec NAME ...`)."""
        self._index(host)
        return f"{self.prefix}-{host}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.prefix}-bridge"

    def address(self, host: str) -> str:
        """`host`'s IPv4 address inside the emulated network."""
        return f"{SUBNET}.{self._index(host) + 1}"

    def interface(self, host: str) -> str:
        """`host`'s interface inside its namespace (e.g. for GLOO_SOCKET_IFNAME)."""
        self._index(host)
        return INTERFACE

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host`'s namespace (`ip netns exec` execs it: the pid is argv's process)."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    # -- set-up and tear-down -----------------------------------------------------------------------------------

    @classmethod
    def check(cls) -> str | None:
        """None if emulation can work here; otherwise the reason. Creates and deletes one namespace once."""
        cls._probe_once()
        return cls._probed[0]

    @classmethod
    def latency_unavailable(cls) -> str | None:
        """None if links can add latency here (the netem qdisc); otherwise why not. Without it the links are
        rate-limited only, and the latency of a profile is not emulated."""
        cls._probe_once()
        return cls._probed[0] or cls._probed[1]

    @classmethod
    def _probe_once(cls) -> None:
        if cls._probed is None:
            cls._probed = cls._probe()

    @staticmethod
    def _probe() -> tuple[str | None, str | None]:
        """(why emulation cannot work, why latency cannot be added); None where it can."""
        if sys.platform != "linux":
            return f"network namespaces need Linux (this is {sys.platform})", None
        if os.geteuid() != 0:
            return f"network namespaces and tc need root (this process runs as uid {os.geteuid()})", None
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            return f"{' and '.join(missing)} not found (install iproute2)", None
        probe = f"atomo-probe-{os.getpid()}"
        try:
            _run(["ip", "netns", "add", probe])
        except (NetworkUnavailable, OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot create a network namespace: {exc}", None
        try:  # everything after the namespace exists deletes it, whatever fails
            try:
                _run(["ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"])
                tc = ["tc", "-n", probe, "qdisc", "add", "dev"]
                _run([*tc, "probe0", "root", "tbf", "rate", "1mbit", "burst", "16384", "limit", "131072"])
            except (NetworkUnavailable, OSError, subprocess.TimeoutExpired) as exc:
                return f"veth pairs or the tbf qdisc are not available: {exc}", None
            try:
                _run([*tc, "probe1", "root", "netem", "delay", "1ms"])
            except (NetworkUnavailable, OSError, subprocess.TimeoutExpired) as exc:
                return None, f"the kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): links add no latency ({exc})"
            return None, None
        finally:
            _run(["ip", "netns", "delete", probe], check=False)

    @staticmethod
    def sweep(name: str) -> list[str]:
        """Delete the namespaces of networks named `name` whose owning process is gone; return them."""
        pattern = re.compile(re.escape(name) + r"-(\d+)-\d+-")
        swept = []
        for namespace in _namespaces():
            match = pattern.match(namespace)
            if match and not _pid_alive(int(match.group(1))):
                _delete_namespace(namespace)
                swept.append(namespace)
        return swept

    def start(self) -> Network:
        if self._up:
            return self
        reason = self.check()
        if reason is not None:
            raise NetworkUnavailable(reason)
        self.latency_emulated = self.latency_unavailable() is None
        self.sweep(self.name)
        _register(self)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, namespace: str) -> None:
        _run(["ip", "netns", "add", namespace])
        self._created.append(namespace)
        _run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def _build(self) -> None:
        bridge = self.bridge_namespace
        self._add_namespace(bridge)
        _run(["ip", "-n", bridge, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", bridge, "link", "set", BRIDGE, "up"])
        for i, host in enumerate(self.hosts):
            namespace, port = self.namespace(host), f"h{i}"
            self._add_namespace(namespace)
            _run(
                ["ip", "-n", bridge, "link", "add", port, "type", "veth", "peer", "name", INTERFACE, "netns", namespace]
            )
            _run(["ip", "-n", bridge, "link", "set", port, "master", BRIDGE])
            _run(["ip", "-n", bridge, "link", "set", port, "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{self.address(host)}/{PREFIX_LEN}", "dev", INTERFACE])
            _run(["ip", "-n", namespace, "link", "set", INTERFACE, "up"])
            if host in self.shaped:
                self._shape(namespace, INTERFACE)  # upload
                self._shape(bridge, port)  # download

    def _shape(self, namespace: str, device: str) -> None:
        """A token bucket at the bandwidth; with netem at the root above it (half the one-way latency)
        where the kernel has netem."""
        rate = self.profile.bytes_per_s
        burst = max(MIN_BURST_BYTES, int(rate * 0.001))
        queue = max(MIN_QUEUE_BYTES, int(rate * QUEUE_S))
        tbf = ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(burst), "limit", str(queue)]
        tc = ["tc", "-n", namespace, "qdisc", "add", "dev", device]
        if self.latency_emulated:
            delay_us = round(self.profile.latency_ms * 1000 / 2)
            _run([*tc, "root", "handle", "1:", "netem", "delay", f"{delay_us}us", "limit", "100000"])
            _run([*tc, "parent", "1:1", "handle", "10:", *tbf])
        else:
            _run([*tc, "root", "handle", "10:", *tbf])

    def close(self) -> None:
        """Kill the processes in the namespaces, then delete them (the veths and qdiscs go with them)."""
        if not self._up:
            return
        self._up = False
        for proc, path in self._forwards:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            path.unlink(missing_ok=True)
        self._forwards.clear()
        for namespace in reversed(self._created):
            _delete_namespace(namespace)
        self._created.clear()
        _unregister(self)

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reaching a server inside from outside -----------------------------------------------------------------

    def forward(self, host: str, path: str | Path, target: str, port: int, timeout_s: float = 10.0) -> str:
        """Relay the Unix socket `path` to `target:port`, from a process in `host`'s namespace; return the
        ZeroMQ endpoint `ipc://<path>` (ipc and tcp speak the same ZMTP bytes). The relay ends with the network."""
        path = Path(path)
        path.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "services.bench.netem", "forward", str(path), target, str(port)]
        proc = subprocess.Popen(self.command(host, argv), stdin=subprocess.DEVNULL)
        self._forwards.append((proc, path))
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if proc.poll() is not None:
                raise NetworkUnavailable(f"the relay from {path} to {target}:{port} exited ({proc.returncode})")
            if time.monotonic() > deadline:
                raise NetworkUnavailable(f"the relay from {path} to {target}:{port} did not start in {timeout_s} s")
            time.sleep(0.02)
        return f"ipc://{path}"


# -- the relay process (`forward`) ------------------------------------------------------------------------------


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            with contextlib.suppress(OSError):
                sock.shutdown(how)


def _relay(path: str, target: str, port: int) -> None:
    """Accept on the Unix socket `path`; relay each connection to a new TCP connection to `target:port`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.replace(path + ".tmp", path)  # the path appears only once it accepts
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection((target, port), timeout=10.0)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.netem")
    sub = parser.add_subparsers(dest="op", required=True)
    forward = sub.add_parser("forward", help="relay a Unix socket to a TCP port (run inside a namespace)")
    forward.add_argument("path")
    forward.add_argument("target")
    forward.add_argument("port", type=int)
    sweep = sub.add_parser("sweep", help="delete the namespaces of dead networks named NAME")
    sweep.add_argument("name")
    args = parser.parse_args(argv)
    if args.op == "forward":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _relay(args.path, args.target, args.port)
        return 0
    for namespace in Network.sweep(args.name):
        print(f"deleted {namespace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
