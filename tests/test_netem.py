"""The emulated network (services/bench/netem.py): namespaces up and gone whatever happens, hosts reachable,
links shaped as the profile says (a timed transfer and a ping-pong between two hosts, real sockets)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from services.bench.netem import PROFILES, LinkProfile, Network, _namespaces, _pid_alive

REASON = Network.check()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network emulation unavailable: {REASON}")

PORT = 7000
# A TCP server inside one host: answers b"p" with b"p" (ping-pong), counts every other byte until end of file,
# then replies b"done".
SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(4)
    print("ready", flush=True)
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := c.recv(1 << 20):
        if data == b"p":
            c.sendall(b"p")
    c.sendall(b"done")
    """
)
# The client: 20 ping-pongs (median round trip), then N bytes timed until the server has read them all.
CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(21):
        t = time.perf_counter(); c.sendall(b"p"); c.recv(1); rtts.append(time.perf_counter() - t)
    n = int(sys.argv[3])
    t = time.perf_counter(); c.sendall(b"x" * n); c.shutdown(socket.SHUT_WR); c.recv(4)
    print(sorted(rtts)[10], n / (time.perf_counter() - t))
    """
)


def ours(network: Network) -> list[str]:
    return [ns for ns in _namespaces() if ns.startswith(network.prefix + "-")]


def measure(net: Network, sender: str, receiver: str, nbytes: int) -> tuple[float, float]:
    """(median round-trip time in s, throughput in bytes/s) from `sender` to `receiver`."""
    server = subprocess.Popen(
        net.command(receiver, [sys.executable, "-c", SERVER, net.address(receiver), str(PORT)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        out = subprocess.run(
            net.command(sender, [sys.executable, "-c", CLIENT, net.address(receiver), str(PORT), str(nbytes)]),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        return float(out[0]), float(out[1])
    finally:
        server.wait(10)


def test_hosts_reachable_links_shaped_and_everything_gone_after():
    profile = LinkProfile(100, 1.0)
    with Network(["ps", "w0", "w1"], profile, name="atomo-test", unshaped=["ctl"]) as net:
        assert set(ours(net)) == {*(net.namespace(h) for h in ("ps", "w0", "w1", "ctl")), net.bridge_namespace}
        assert len({net.address(h) for h in ("ps", "w0", "w1", "ctl")}) == 4
        assert net.interface("ps") == "eth0"
        assert net.command("w0", ["true"]) == ["ip", "netns", "exec", net.namespace("w0"), "true"]
        # 1.5 s worth of bytes at the profile's bandwidth, from a worker to the PS.
        rtt, rate = measure(net, "w0", "ps", int(profile.bytes_per_s * 1.5))
        print(f"100 Mbit/s 1 ms: measured {rate * 8 / 1e6:.1f} Mbit/s, RTT {rtt * 1e3:.2f} ms")
        assert 0.75 * profile.bytes_per_s <= rate <= 1.1 * profile.bytes_per_s
        if net.latency_emulated:
            assert 0.75 * 2 * profile.latency_ms / 1e3 <= rtt <= 1.5 * 2 * profile.latency_ms / 1e3 + 0.5e-3
        # The unshaped driver host still crosses the PS's shaped download.
        _, rate = measure(net, "ctl", "ps", int(profile.bytes_per_s * 0.5))
        assert rate <= 1.1 * profile.bytes_per_s
        names = ours(net)
    assert not set(names) & set(_namespaces())


def test_round_trip_time_is_twice_the_latency():
    reason = Network.latency_unavailable()
    if reason is not None:
        pytest.skip(reason)
    profile = PROFILES["edge"]
    with Network(["a", "b"], profile, name="atomo-test") as net:
        rtt, _ = measure(net, "a", "b", 100_000)
    assert 0.8 * 2 * profile.latency_ms / 1e3 <= rtt <= 1.3 * 2 * profile.latency_ms / 1e3


def test_an_exception_inside_the_block_removes_namespaces_and_kills_their_processes():
    with pytest.raises(RuntimeError, match="boom"), Network(["a", "b"], PROFILES["1gbit"], name="atomo-test") as net:
        sleeper = subprocess.Popen(net.command("a", ["sleep", "60"]))
        names = ours(net)
        assert len(names) == 3
        raise RuntimeError("boom")
    assert sleeper.wait(5) is not None
    assert not set(names) & set(_namespaces())


HOLDER = textwrap.dedent(
    """
    import subprocess, sys, time
    from services.bench.netem import Network, LinkProfile
    net = Network(["a", "b"], LinkProfile(100, 1.0), name=sys.argv[1]).start()
    sleeper = subprocess.Popen(net.command("a", ["sleep", "60"]))
    print(net.prefix, sleeper.pid, flush=True)
    time.sleep(60)
    """
)


def _holder(name: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, name], stdout=subprocess.PIPE, text=True)
    prefix, pid = proc.stdout.readline().split()
    assert [ns for ns in _namespaces() if ns.startswith(prefix + "-")]
    return proc, prefix, int(pid)


def test_sigterm_to_the_holding_process_removes_everything():
    proc, prefix, sleeper = _holder("atomo-test")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == -signal.SIGTERM  # torn down, then the default action: killed by the signal
    assert not [ns for ns in _namespaces() if ns.startswith(prefix + "-")]
    assert not _pid_alive(sleeper) or _is_zombie(sleeper)


def test_a_network_sweeps_what_a_killed_run_left():
    proc, prefix, sleeper = _holder("atomo-test-swept")
    proc.kill()  # SIGKILL: no handler runs, the namespaces stay
    proc.wait(10)
    left = [ns for ns in _namespaces() if ns.startswith(prefix + "-")]
    assert len(left) == 3
    assert Network.sweep("atomo-test-swept") == left
    assert not [ns for ns in _namespaces() if ns.startswith(prefix + "-")]
    deadline = time.monotonic() + 5
    while _pid_alive(sleeper) and not _is_zombie(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(sleeper) or _is_zombie(sleeper)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_forward_relays_a_unix_socket_into_the_network(tmp_path):
    with Network(["srv"], PROFILES["1gbit"], name="atomo-test", unshaped=["ctl"]) as net:
        server = subprocess.Popen(
            net.command("srv", [sys.executable, "-c", SERVER, net.address("srv"), str(PORT)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "ready"
        endpoint = net.forward("ctl", tmp_path / "relay.sock", net.address("srv"), PORT)
        assert endpoint == f"ipc://{tmp_path / 'relay.sock'}"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(tmp_path / "relay.sock"))
            s.sendall(b"p")
            assert s.recv(1) == b"p"
            s.sendall(b"x" * 100_000)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(4) == b"done"
        server.wait(10)


@pytest.mark.parametrize(
    ("hosts", "kwargs", "message"),
    [
        ([], {}, "at least one host"),
        (["a", "a"], {}, "distinct"),
        (["a b"], {}, "host name"),
        (["bridge"], {}, "not 'bridge'"),
        (["a"], {"name": "9bad"}, "network name"),
        (["a"], {"unshaped": ["a"]}, "distinct"),
    ],
)
def test_bad_input_is_refused(hosts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Network(hosts, PROFILES["1gbit"], **kwargs)


def test_bad_profiles_are_refused():
    with pytest.raises(ValueError, match="bandwidth_mbit must be positive"):
        LinkProfile(0, 1.0)
    with pytest.raises(ValueError, match="latency_ms"):
        LinkProfile(10, -1)
    for bandwidth in (1e308, float("inf"), float("nan"), 1e-3):  # tbf cannot be given these (1e308: an overflow)
        with pytest.raises(ValueError, match="bandwidth_mbit must be"):
            LinkProfile(bandwidth, 1.0)
    with pytest.raises(ValueError, match="latency_ms must be from 0 to"):
        LinkProfile(10, 1e9)
    with pytest.raises(KeyError, match="no host 'x'"):
        Network(["a"], PROFILES["1gbit"]).address("x")


def test_no_network_left_from_this_process():
    assert not [ns for ns in _namespaces() if f"-{os.getpid()}-" in ns]


@pytest.mark.parametrize("fails", ["veth", "tbf", "timeout"])
def test_the_probe_deletes_its_namespace_whatever_fails(monkeypatch, fails):
    import services.bench.netem as netem

    calls = []

    def fake_run(argv, check=True):
        calls.append(argv)
        if fails == "veth" and "veth" in argv:
            raise netem.NetworkUnavailable("no veth")
        if fails == "tbf" and "tbf" in argv:
            raise netem.NetworkUnavailable("no tbf")
        if fails == "timeout" and "veth" in argv:
            raise subprocess.TimeoutExpired(argv, 1)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(netem, "_run", fake_run)
    reason, _ = Network._probe()
    assert reason is not None and "not available" in reason
    assert calls[-1][:3] == ["ip", "netns", "delete"]
