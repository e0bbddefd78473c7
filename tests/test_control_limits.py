"""The control service under slow or greedy clients, over real HTTP on 127.0.0.1: stalled headers and bodies
time out, idle connections cannot starve /healthz, a store read that waits does not hold the event loop, the
read cache is bounded in bytes and keyed on the validated query, and a spec's lists are bounded."""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from helpers import wait_until

from services.common.spec import MAX_MILESTONES
from services.control.app import Settings, create_app
from services.control.commands.serve import server_config
from services.control.connections import ConnectionLimits
from services.control.launchers import ControlProcess, free_port

TOKEN = "limits-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEADER_TIMEOUT_S = 2  # the service's limits in these tests: short, so that the tests are quick
BODY_TIMEOUT_S = 2
CLOSE_BOUND_S = 60  # generous: every stalled connection is closed well within this on a loaded machine


@pytest.fixture(scope="module")
def service(tmp_path_factory, dead_ps):
    where = tmp_path_factory.mktemp("control")
    extra = ("--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S))
    control = ControlProcess(where / "control.db", dead_ps, TOKEN, extra_args=extra, log_path=where / "c.log")
    yield control.start()
    control.stop()


@contextlib.contextmanager
def sockets(n: int, port: int, send: bytes = b""):
    """`n` client connections to the service, each having sent `send`; all closed on exit."""
    opened = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            if send:
                s.sendall(send)
            opened.append(s)
        yield opened
    finally:
        for s in opened:
            s.close()


def closed_by_server(conns: list[socket.socket], timeout_s: float) -> dict[socket.socket, bytes]:
    """Wait until the server has closed each of `conns` (or `timeout_s` passed): what each received."""
    received = {s: b"" for s in conns}
    with selectors.DefaultSelector() as sel:
        for s in conns:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[key.fileobj] += data
                else:
                    sel.unregister(key.fileobj)
        still_open = {key.fileobj for key in sel.get_map().values()}
    return {s: r for s, r in received.items() if s not in still_open}


def port_of(control) -> int:
    return int(control.url.rsplit(":", 1)[1])


# Slow clients -----------------------------------------------------------------------------------------------


def test_slowloris_connections_are_answered_408_and_closed_while_healthz_answers(service):
    """200 connections that send part of a request line and headers and stall: /healthz answers meanwhile,
    and the server closes every one of them with a 408 that names the limit."""
    partial = b"GET /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    with sockets(200, port_of(service), partial) as slow:
        assert httpx.get(service.url + "/healthz", timeout=30).json() == {"status": "ok"}
        closed = closed_by_server(slow, CLOSE_BOUND_S)
        assert len(closed) == 200, f"{200 - len(closed)} of 200 stalled connections still open"
        for answer in closed.values():
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b'"code":"request_timeout"' in answer and b"--header-timeout" in answer, answer
        assert httpx.get(service.url + "/healthz", timeout=30).status_code == 200


def test_a_kept_alive_connection_that_stalls_in_its_next_request_is_closed(service):
    """The header deadline starts again after each response: a client that sends a whole request, then part
    of the next one, is closed too (uvicorn's keep-alive timeout stops at the next request's first byte)."""
    with sockets(1, port_of(service)) as (conn,):
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while b'{"status":"ok"}' not in first:
            chunk = conn.recv(65536)
            assert chunk, first
            first += chunk
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        closed = closed_by_server([conn], CLOSE_BOUND_S)
        assert conn in closed, "the stalled keep-alive connection is still open"
        assert closed[conn].startswith(b"HTTP/1.1 408 "), closed[conn]


def test_a_connection_that_sends_nothing_is_closed(service):
    with sockets(20, port_of(service)) as silent:
        closed = closed_by_server(silent, CLOSE_BOUND_S)
        assert len(closed) == 20 and set(closed.values()) == {b""}  # closed quietly: nothing was asked


def test_a_stalled_body_is_408_naming_the_limit(service):
    """A body shorter than its Content-Length, never finished: 408 once the body deadline passes, and the
    connection is closed; nothing is stored."""
    head = (
        b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n"
    )
    before = httpx.get(service.url + "/v1/runs", headers=AUTH, timeout=30).json()["runs"]
    with sockets(1, port_of(service), head + b'{"name": "slow') as (conn,):
        closed = closed_by_server([conn], CLOSE_BOUND_S)
        assert conn in closed, "the stalled body's connection is still open"
        status, _, body = closed[conn].partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in status.lower(), status
        error = httpx.Response(408, content=body).json()["error"]
        assert error["code"] == "request_timeout" and error["details"] == {"limit_s": BODY_TIMEOUT_S}, error
        assert "--body-timeout" in error["message"], error
    assert httpx.get(service.url + "/v1/runs", headers=AUTH, timeout=30).json()["runs"] == before


@pytest.mark.parametrize("where", ["header", "url"])
def test_an_oversized_request_head_is_431_naming_the_limit(service, where):
    """A request line or headers beyond --max-header-bytes (default 64 KiB): 431 and closed, whatever follows
    (the parser would otherwise buffer them without bound); 32 KiB of headers are served."""
    big = b"a" * (200 << 10)
    head = b"GET /healthz" + (b"?q=" + big if where == "url" else b"") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if where == "header":
        head += b"X-Big: " + big + b"\r\n"
    with sockets(1, port_of(service)) as (conn,):
        with contextlib.suppress(ConnectionError):  # the server may close before it has read everything
            conn.sendall(head + b"\r\n")
        closed = closed_by_server([conn], CLOSE_BOUND_S)
        assert conn in closed, "the oversized request's connection is still open"
        status, _, body = closed[conn].partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 431 "), closed[conn][:300]
        error = httpx.Response(431, content=body).json()["error"]
        assert error["code"] == "request_header_fields_too_large" and error["details"] == {"limit": 64 << 10}
        assert "--max-header-bytes" in error["message"], error
    ok = httpx.get(service.url + "/healthz", headers={"X-Big": "a" * (32 << 10)}, timeout=30)
    assert ok.json() == {"status": "ok"}


def test_a_pipelined_request_is_not_charged_with_the_bytes_of_the_one_before(service):
    """Two pipelined requests in one write, the first complete with 40 KiB of headers and the second's head
    begun (30 KiB so far) and finished later: both answered 200. Counting the whole read as the second
    request's head (70 KiB > the 64 KiB limit) had answered it 431."""
    first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"a" * (40 << 10) + b"\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-B: " + b"b" * (30 << 10)
    with sockets(1, port_of(service)) as (conn,):
        conn.sendall(first + second)
        time.sleep(0.5)
        conn.sendall(b"\r\n\r\n")
        conn.settimeout(30)
        received = b""
        deadline = time.monotonic() + 30
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
            assert time.monotonic() < deadline, received[:300]
            chunk = conn.recv(65536)
            assert chunk, f"closed after {received[:300]!r}"
            received += chunk
    assert received.count(b"HTTP/1.1 200 ") == 2, received[:600]


def test_a_pipelined_request_with_an_oversized_head_is_still_431(service):
    """The second of two pipelined requests sends 100 KiB of complete header lines in the same write and no
    end of head: counted from its fields, it is over the limit, 431."""
    first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        b"X-%d: " % i + b"b" * (4 << 10) + b"\r\n" for i in range(25)
    )
    with sockets(1, port_of(service)) as (conn,):
        conn.sendall(first + second)
        closed = closed_by_server([conn], CLOSE_BOUND_S)
    assert conn in closed, "the oversized pipelined request's connection is still open"
    assert b"HTTP/1.1 431 " in closed[conn], closed[conn][:600]


# Greedy clients ---------------------------------------------------------------------------------------------

FD_LIMIT = 320  # the service's open-file limit in the next test
MAX_CONNECTIONS = 32


def test_idle_connections_beyond_the_open_file_limit_do_not_starve_healthz(tmp_path, dead_ps):
    """A service with 320 file descriptors and --max-connections 32: 400 idle connections (more than it has
    descriptors) do not keep /healthz out; the longest-idle ones are closed to make room."""
    port = free_port()
    cmd = [sys.executable, "-m", "services", "serve", "--port", str(port), "--db", str(tmp_path / "c.db")]
    cmd += ["--ps", dead_ps, "--log-level", "warning", "--max-connections", str(MAX_CONNECTIONS)]
    cmd += ["--header-timeout", "600"]  # so that only the connection limit can free a descriptor here
    env = {k: v for k, v in os.environ.items() if k != "ATOMO_API_TOKEN"}

    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_files)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url + "/healthz", timeout=1).status_code == 200

        wait_until(healthy, 30, "atomo serve to answer")
        with sockets(400, port) as idle:
            assert httpx.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
            assert httpx.get(url + "/readyz", timeout=30).status_code == 503  # no PS; answered all the same
            closed = closed_by_server(idle[:300], CLOSE_BOUND_S)  # the oldest ones were closed for newer ones
            assert len(closed) >= 300 - MAX_CONNECTIONS, len(closed)
            assert not (tmp_path / "serve.log").read_text().count("Too many open files")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# The event loop -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def readers_blocked(db_path: str):
    """Hold every WAL read-mark lock of the store (bytes 123..127 of its -shm file, SQLite's WAL_READ_LOCK
    slots): until released, a read transaction of the service's store waits (SQLite retries for about 10 s
    before it gives up). A real lock from another process, as a checkpointer or a backup would hold one."""
    fd = os.open(db_path + "-shm", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 5, 123, os.SEEK_SET)
        yield
    finally:
        os.close(fd)  # releases the lock


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(
        next(line for line in text.splitlines() if line.startswith("atomo_control_http_requests_in_flight")).split()[-1]
    )


def test_a_store_read_that_waits_does_not_hold_healthz(service):
    """A metrics read waits on the store (its read locks held): /metrics and /healthz still answer while it
    is in flight, proven by order: the read cannot finish before the lock is released, and /metrics shows
    it in flight first. (With the read on the event loop, /metrics would not answer until it gave up.)"""
    run = httpx.post(service.url + "/v1/runs", json={"steps": 3}, headers=AUTH, timeout=30).json()
    in_flight(service.url)  # /metrics counts the runs again only after a write: now, not while reads wait
    result = {}

    def slow_read():
        path = f"/v1/runs/{run['id']}/metrics?since=-1&limit=9999"  # a query no one asked before: not cached
        result["response"] = httpx.get(service.url + path, headers=AUTH, timeout=60)

    with readers_blocked(service.db_path):
        reader = threading.Thread(target=slow_read)
        reader.start()
        wait_until(lambda: in_flight(service.url) >= 2, 30, "the read in flight (besides /metrics itself)")
        assert httpx.get(service.url + "/healthz", timeout=30).json() == {"status": "ok"}
        assert reader.is_alive() and "response" not in result  # the read is still waiting on the store
    reader.join(timeout=60)
    assert result["response"].status_code == 200, result["response"].text
    assert result["response"].json() == {"run_id": run["id"], "records": [], "next_since": -1}


def test_a_connection_beyond_the_limit_when_all_are_busy_is_503(tmp_path, dead_ps):
    """--max-connections 2, both connections with a read waiting on the store: a third connection is answered
    503 naming the limit (nothing idle to close for it); once the store frees up, both reads answer."""
    control = ControlProcess(tmp_path / "c.db", dead_ps, TOKEN, extra_args=("--max-connections", "2")).start()
    try:
        run_id = httpx.post(control.url + "/v1/runs", json={}, headers=AUTH, timeout=30).json()["id"]
        in_flight(control.url)  # counted now: /metrics reads no more while the reads wait
        results = {}

        def read(name: str, since: int):
            path = f"/v1/runs/{run_id}/metrics?since={since}"
            try:
                results[name] = httpx.get(control.url + path, headers=AUTH, timeout=60)
            except httpx.HTTPError as exc:  # closed to make room while still idle: asked again below
                results[name] = exc

        with readers_blocked(control.db_path):
            first = threading.Thread(target=read, args=("first", 1))
            first.start()
            wait_until(lambda: in_flight(control.url) >= 2, 30, "the first read in flight")

            seconds = []

            def refused():
                if not seconds or not seconds[-1].is_alive():  # none yet, or closed while idle: ask again
                    seconds.append(threading.Thread(target=read, args=("second", 2)))
                    seconds[-1].start()
                with contextlib.suppress(httpx.HTTPError):
                    response = httpx.get(control.url + "/healthz", timeout=30)
                    return response if response.status_code == 503 else None

            response = wait_until(refused, 30, "a connection refused while both are busy", interval_s=0.2)
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "unavailable" and error["details"] == {"limit": 2}, error
            assert "--max-connections" in error["message"], error
            assert first.is_alive() and seconds[-1].is_alive()
        first.join(timeout=60)
        seconds[-1].join(timeout=60)
        assert results["first"].status_code == results["second"].status_code == 200, results
        assert httpx.get(control.url + "/healthz", timeout=30).status_code == 200
    finally:
        control.stop()


# The read cache, in the test's process (to look at it) and over real HTTP ---------------------------------


@contextlib.contextmanager
def served(app):
    """`app` served as `atomo serve` serves it, by uvicorn in a thread, on a free loopback port."""
    port = free_port()
    server = uvicorn.Server(server_config(app, ConnectionLimits(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: server.started, 30, "uvicorn to start")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


RECORD = {"loss": 1.0, "bytes_up": 1000, "bytes_down": 1000, "encode_s": 0.001, "pad": "x" * 200}


def test_read_cache_is_keyed_on_the_validated_query_and_bounded_in_bytes(tmp_path, dead_ps):
    budget = 64 << 10
    settings = Settings(db_path=str(tmp_path / "c.db"), ps_endpoint=dead_ps, read_cache_bytes=budget)
    app = create_app(settings)
    cache, store = app.state.cache, app.state.store
    with served(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        run_id = http.post("/v1/runs", json={"steps": 3}).json()["id"]
        store.add_metrics(run_id, [RECORD | {"step": s} for s in range(2000)])  # the app's own store: a write

        # unknown, repeated and reordered parameters: one answer, one entry
        first = http.get(f"/v1/runs/{run_id}").content
        for i in range(50):
            assert http.get(f"/v1/runs/{run_id}?junk{i}={i}").content == first
        runs = {
            http.get(q).content
            for q in ("/v1/runs?state=queued&state=running", "/v1/runs?state=running&state=queued&state=queued&x=1")
        }
        assert len(runs) == 1
        assert len(cache) == 2

        # many distinct pages of records: the cache never holds more than its budget
        for since in range(-1, 600, 20):  # 30 pages of about 6 kB
            page = http.get(f"/v1/runs/{run_id}/metrics", params={"since": since, "limit": 20}).json()
            assert [r["step"] for r in page["records"]] == list(range(since + 1, since + 21))
            assert page["next_since"] == since + 20 and page["records"][0] == RECORD | {"step": since + 1}
            assert cache.bytes <= budget
        assert 4 < len(cache) < 30  # some pages kept, the oldest dropped

        # an answer larger than a quarter of the budget is served, not kept
        held = len(cache)
        big = http.get(f"/v1/runs/{run_id}/metrics", params={"limit": 2000})
        assert len(big.content) > budget // 4 and len(big.json()["records"]) == 2000
        assert len(cache) == held and cache.bytes <= budget

        # a write makes every answer stale: the next read sees it
        assert http.post(f"/v1/runs/{run_id}/cancel").json()["state"] == "cancelled"
        assert http.get(f"/v1/runs/{run_id}?junk=1").json()["state"] == "cancelled"


# Bounded specs ----------------------------------------------------------------------------------------------


def test_step_milestones_are_bounded(service):
    post = lambda spec: httpx.post(service.url + "/v1/runs", json=spec, headers=AUTH, timeout=30)  # noqa: E731
    too_many = post({"lr_schedule": "step", "step_milestones": list(range(MAX_MILESTONES + 1))})
    assert too_many.status_code == 422, too_many.text
    error = too_many.json()["error"]
    assert error["message"] == "invalid request: step_milestones", error
    assert str(MAX_MILESTONES) in error["details"][0]["message"], error
    negative = post({"step_milestones": [5, -1]})
    assert negative.status_code == 422 and negative.json()["error"]["details"][0]["field"] == "step_milestones[1]"
    huge = post({"step_milestones": [2**63]})
    assert huge.status_code == 422, huge.text
    assert post({"step_milestones": list(range(MAX_MILESTONES))}).status_code == 201
