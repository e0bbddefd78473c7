"""The Kubernetes launcher against an in-memory Kubernetes API served over real HTTP (kmock's emulator).

The real `kubernetes` client talks to the emulator on loopback; every request it sends is recorded, so the
tests check the exact requests (method, path, query, content type, body), the error paths (403, 404, 409,
429 and 5xx tried again, a request that times out, a refused connection) and the (apiGroup, resource, verb)
set the code uses, which is `REQUIRED_RULES`, the rules the chart's Role must grant. What the emulator cannot
do, an API server that answers a byte at a time or with a body that is not a Kubernetes object, a small raw
HTTP server on loopback does (`RawAPI`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import kmock
import pytest
from helpers import wait_until
from kubernetes import client as k8s_client

from services.control import kubernetes as kubernetes_module
from services.control.kubernetes import (
    REQUIRED_RULES,
    KubernetesLauncher,
    LaunchError,
    label_selector,
    parse_groups,
    split_workers,
)

NS = "atomo"
MAIN = "atomo-workers"
STATEFULSETS = kmock.resource("apps", "v1", "statefulsets")
PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")
SELECTOR = {"app.kubernetes.io/instance": "atomo", "app.kubernetes.io/component": "worker"}
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
TOKEN = "s3cret-service-account-token"


class Emulator:
    """kmock's Kubernetes emulator on 127.0.0.1 in its own thread and event loop."""

    def __init__(self):
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Kubernetes emulator did not start")

    def _run(self):
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self):
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            self.handler, self.url, self._stop = handler, str(server.url).rstrip("/"), asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def call(self, fn):
        """Run fn() on the emulator's loop (its state is not shared across threads otherwise)."""

        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def put(self, resource, name: str, obj: dict) -> None:
        def put():
            self.handler.objects[resource, NS, name] = obj

        self.call(put)

    def get(self, resource, name: str) -> dict:
        return self.call(lambda: dict(self.handler.objects[resource, NS, name].raw))

    def react(self, criteria, payload) -> None:
        """Answer requests matching `criteria` with `payload` (e.g. a KubernetesError) from now on."""

        def react():
            self.handler[criteria] << payload

        self.call(react)

    def requests(self) -> list[tuple]:
        """(method, path, query, content type, JSON body) of every request so far, in order."""
        return self.call(
            lambda: [
                (str(r.method.value), r.url.path, dict(r.params), r.headers.get("Content-Type"), r.data)
                for r in self.handler
            ]
        )

    def headers(self) -> list[dict]:
        return self.call(lambda: [dict(r.headers) for r in self.handler])

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)


class RawAPI:
    """An HTTP/1.1 server on 127.0.0.1 that answers each request as `answer(method, path)` says: None closes
    the connection without an answer, else a tuple (status, body bytes, drip): drip None sends it at once,
    "head" sends all of it a byte every DRIP_S (the status line first), "body" sends the head at once and the
    body a byte every DRIP_S. Records every request as the emulator does: (method, path, query, content
    type, JSON body), and in `delivered` whether each answer went out whole (False: the client shut the
    connection first)."""

    DRIP_S = 0.05

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[tuple] = []
        self.delivered: list[bool] = []
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, name="raw-api", daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection):
        with connection, connection.makefile("rb") as reader:
            while not self._closed.is_set():
                line = reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", 0)))
                url = urllib.parse.urlsplit(target)
                query = dict(urllib.parse.parse_qsl(url.query))
                self.requests.append(
                    (method, url.path, query, headers.get("content-type"), json.loads(body) if body else None)
                )
                answer = self.answer(method, url.path)
                if answer is None:
                    return
                status, payload, drip = answer
                head = f"HTTP/1.1 {status} Answer\r\nContent-Type: application/json\r\n"
                head = (head + f"Content-Length: {len(payload)}\r\n\r\n").encode()
                at_once = {None: len(head) + len(payload), "head": 0, "body": len(head)}[drip]
                message = head + payload
                try:
                    connection.sendall(message[:at_once])
                    for i in range(at_once, len(message)):
                        if self._closed.wait(self.DRIP_S):
                            return
                        connection.sendall(message[i : i + 1])
                except OSError:  # the client shut the connection mid-answer
                    self.delivered.append(False)
                    return
                self.delivered.append(True)

    def close(self):
        self._closed.set()
        self._server.close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def raw_api():
    """A factory of RawAPI servers, each closed after the test."""
    servers = []

    def start(answer):
        servers.append(RawAPI(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def rbac_rules(requests) -> set[tuple[str, str, str]]:
    """The (apiGroup, resource, verb) that each recorded request needs, as RBAC authorizes it; a request
    outside a namespace fails the test (the launcher must need nothing cluster-scoped)."""
    rules = set()
    for method, path, query, *_ in requests:
        parts = path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        assert rest[:1] == ["namespaces"] and len(rest) >= 3, f"not a namespaced request: {method} {path}"
        resource, name, sub = rest[2], (rest[3:4] or [None])[0], "/".join(rest[4:])
        verb = {
            "GET": "watch" if query.get("watch") == "true" else ("get" if name else "list"),
            "PATCH": "patch",
            "PUT": "update",
            "POST": "create",
            "DELETE": "delete" if name else "deletecollection",
        }[method]
        rules.add((group, f"{resource}/{sub}" if sub else resource, verb))
    return rules


# -- objects as a real API server would hold them --------------------------------------------------------------


def statefulset(name: str = MAIN, replicas: int = 0, labels: dict | None = None) -> dict:
    labels = {**SELECTOR, "atomo.dev/group": name} if labels is None else labels
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "worker"}]}},
        },
        "status": {"replicas": replicas, "readyReplicas": 0},
    }


def pod(
    name: str,
    owner: str = MAIN,
    phase: str = "Running",
    ready: bool = True,
    node: str | None = "gpu-node-1",
    conditions: list | None = None,
    containers: list | None = None,
    labels: dict | None = None,
) -> dict:
    labels = {**SELECTOR, "atomo.dev/group": owner} if labels is None else labels
    if conditions is None:
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "name": owner,
                    "uid": f"uid-{owner}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"nodeName": node, "containers": [{"name": "worker"}]},
        "status": {"phase": phase, "conditions": conditions, "containerStatuses": containers or []},
    }


def pending_unschedulable(name: str) -> dict:
    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}]
    return pod(name, phase="Pending", ready=False, node=None, conditions=conditions)


def event(
    name: str,
    involved: str,
    reason: str,
    message: str,
    kind: str = "Pod",
    type_: str = "Warning",
    at: str = "2026-11-27T10:00:00Z",
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": NS},
        "involvedObject": {"kind": kind, "name": involved, "namespace": NS},
        "type": type_,
        "reason": reason,
        "message": message,
        "lastTimestamp": at,
    }


SELECTOR_QUERY = "app.kubernetes.io/component=worker,app.kubernetes.io/instance=atomo,atomo.dev/group=atomo-workers"
GET_STS = ("GET", f"/apis/apps/v1/namespaces/{NS}/statefulsets/{MAIN}", {}, None, None)
LIST_PODS = ("GET", f"/api/v1/namespaces/{NS}/pods", {"labelSelector": SELECTOR_QUERY}, None, None)


def scale_request(name: str, replicas: int) -> tuple:
    path = f"/apis/apps/v1/namespaces/{NS}/statefulsets/{name}/scale"
    return ("PATCH", path, {}, "application/merge-patch+json", {"spec": {"replicas": replicas}})


def events_request(kind: str, name: str) -> tuple:
    query = {"fieldSelector": f"involvedObject.kind={kind},involvedObject.name={name}"}
    return ("GET", f"/api/v1/namespaces/{NS}/events", query, None, None)


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def emulator():
    emu = Emulator()
    try:
        yield emu
    finally:
        emu.stop()


def api_client(url: str):
    configuration = k8s_client.Configuration(host=url)
    configuration.api_key = {"authorization": TOKEN}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return k8s_client.ApiClient(configuration)


def make_launcher(emu, groups=(MAIN,), idle: int = 0, timeout_s: float = 5.0, **options) -> KubernetesLauncher:
    """A launcher on `emu` (an Emulator or a RawAPI); retries back off 10 ms at first."""
    return KubernetesLauncher(
        NS,
        list(groups),
        idle_replicas=idle,
        api_client=api_client(emu.url),
        request_timeout_s=timeout_s,
        poll_interval_s=0.01,
        **{"backoff_s": 0.01, "max_backoff_s": 0.05} | options,
    )


# -- scaling ----------------------------------------------------------------------------------------------------


def test_scale_for_run_sends_one_merge_patch_of_the_scale_subresource(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=0))
    launcher = make_launcher(emulator, idle=1)

    assert launcher.scale_for_run(3) == {MAIN: 3}
    assert emulator.requests() == [scale_request(MAIN, 3)]
    assert emulator.get(STATEFULSETS, MAIN)["spec"]["replicas"] == 3
    assert emulator.headers()[0]["Authorization"] == f"Bearer {TOKEN}"  # the ServiceAccount's token is sent

    assert launcher.release() == {MAIN: 1}  # back to the idle replicas
    assert emulator.requests()[1:] == [scale_request(MAIN, 1)]
    assert emulator.get(STATEFULSETS, MAIN)["spec"]["replicas"] == 1


def test_workers_fill_the_groups_in_order_up_to_each_groups_max(emulator):
    extra = "atomo-workers-h100"
    for name in (MAIN, extra):
        emulator.put(STATEFULSETS, name, statefulset(name, replicas=0))
    launcher = make_launcher(emulator, groups=(f"{MAIN}=2", extra))

    assert launcher.scale_for_run(5) == {MAIN: 2, extra: 3}
    assert launcher.release() == {MAIN: 0, extra: 0}
    assert emulator.requests() == [
        scale_request(MAIN, 2),
        scale_request(extra, 3),
        scale_request(MAIN, 0),
        scale_request(extra, 0),
    ]


def test_more_workers_than_the_groups_hold_is_refused_before_any_request(emulator):
    launcher = make_launcher(emulator, groups=(f"{MAIN}=2", "atomo-workers-h100=1"))
    with pytest.raises(LaunchError, match=r"4 workers asked for, but the worker StatefulSets hold 3"):
        launcher.scale_for_run(4)
    assert emulator.requests() == []


def test_group_and_selector_parsing():
    assert parse_groups(["a", "b=3"])[1].max_replicas == 3
    assert split_workers(parse_groups(["a=1", "b=0", "c"]), 4) == {"a": 1, "b": 0, "c": 3}
    assert split_workers(parse_groups(["a"]), 0) == {"a": 0}
    for bad, why in [
        (["A"], "not a valid name"),
        (["a=x"], "whole number"),
        (["a", "a=2"], "listed twice"),
        ([], "no worker StatefulSet"),
    ]:
        with pytest.raises(LaunchError, match=why):
            parse_groups(bad)
    selector = {
        "matchLabels": {"b": "2", "a": "1"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["x", "y"]},
            {"key": "gone", "operator": "DoesNotExist"},
        ],
    }
    assert label_selector(selector) == "a=1,b=2,tier in (x,y),!gone"


# -- waiting for the workers -------------------------------------------------------------------------------------


def test_wait_for_workers_returns_once_the_ps_reports_the_count(emulator):
    launcher = make_launcher(emulator)
    reports = itertools.chain([0, 1, 1], itertools.repeat(2))
    assert launcher.wait_for_workers(2, lambda: next(reports), timeout_s=10) is True
    assert launcher.wait_for_workers(2, lambda: 0, timeout_s=10, cancelled=lambda: True) is False
    assert emulator.requests() == []  # only the PS is asked while waiting


def test_a_timed_out_wait_names_the_pending_pod_and_why(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=2))
    emulator.put(PODS, f"{MAIN}-0", pod(f"{MAIN}-0"))
    emulator.put(PODS, f"{MAIN}-1", pending_unschedulable(f"{MAIN}-1"))
    # another StatefulSet's pod with the same labels: not one of ours (its controller is not MAIN)
    emulator.put(
        PODS,
        "other-0",
        pending_unschedulable("other-0")
        | {
            "metadata": {
                "name": "other-0",
                "namespace": NS,
                "labels": {**SELECTOR, "atomo.dev/group": MAIN},
                "ownerReferences": [{"kind": "StatefulSet", "name": "other", "controller": True}],
            }
        },
    )
    emulator.put(EVENTS, "e1", event("e1", f"{MAIN}-1", "FailedScheduling", UNSCHEDULABLE))  # said already
    emulator.put(
        EVENTS,
        "e2",
        event(
            "e2",
            f"{MAIN}-1",
            "NotTriggerScaleUp",
            "pod didn't trigger scale-up: 2 max node group size reached",
            at="2026-11-27T10:00:05Z",
        ),
    )
    emulator.put(EVENTS, "e3", event("e3", f"{MAIN}-1", "Scheduled", "fine", type_="Normal"))
    launcher = make_launcher(emulator)

    with pytest.raises(LaunchError) as failure:
        launcher.wait_for_workers(2, lambda: 1, timeout_s=0.05)

    assert str(failure.value) == (
        "1 of 2 workers registered with the PS within 0.05 s; "
        f"pod {MAIN}-1 is Pending: Unschedulable: {UNSCHEDULABLE} "
        "(events: NotTriggerScaleUp: pod didn't trigger scale-up: 2 max node group size reached)"
    )
    assert failure.value.__cause__ is None
    assert emulator.requests() == [GET_STS, LIST_PODS, events_request("Pod", f"{MAIN}-1")]


def test_a_timed_out_wait_names_missing_pods_crashing_containers_and_an_unreachable_ps(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=3))
    crashing = {
        "name": "worker",
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
    }
    emulator.put(PODS, f"{MAIN}-0", pod(f"{MAIN}-0", ready=False, containers=[crashing]))
    pulling = {
        "name": "worker",
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "atomo:9.9"'}},
    }
    emulator.put(PODS, f"{MAIN}-1", pod(f"{MAIN}-1", phase="Pending", ready=False, containers=[pulling]))
    quota = 'pods "atomo-workers-2" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1'
    emulator.put(
        EVENTS, "q", event("q", MAIN, "FailedCreate", f"create Pod atomo-workers-2 failed: {quota}", kind="StatefulSet")
    )
    launcher = make_launcher(emulator)

    def ps_down():
        raise TimeoutError("no reply from the PS at tcp://atomo-ps:5556 within 2000 ms")

    with pytest.raises(LaunchError) as failure:
        launcher.wait_for_workers(3, ps_down, timeout_s=0.05)

    assert str(failure.value) == (
        "0 of 3 workers registered with the PS within 0.05 s (the PS could not be asked: TimeoutError: no reply "
        "from the PS at tcp://atomo-ps:5556 within 2000 ms); "
        f"StatefulSet {MAIN} has 2 of its 3 pods (events: FailedCreate: create Pod atomo-workers-2 failed: {quota}); "
        f"pod {MAIN}-0 is Running, not ready: container worker CrashLoopBackOff: back-off 40s (last exit code 1, "
        "Error); "
        f'pod {MAIN}-1 is Pending: container worker ImagePullBackOff: Back-off pulling image "atomo:9.9"'
    )
    assert emulator.requests() == [
        GET_STS,
        LIST_PODS,
        events_request("StatefulSet", MAIN),
        events_request("Pod", f"{MAIN}-0"),
        events_request("Pod", f"{MAIN}-1"),
    ]


def test_ready_pods_whose_workers_never_registered_point_at_their_logs(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=1))
    emulator.put(PODS, f"{MAIN}-0", pod(f"{MAIN}-0"))
    with pytest.raises(LaunchError, match=r"every worker pod is running and ready, so the workers did not reach"):
        make_launcher(emulator).wait_for_workers(1, lambda: 0, timeout_s=0.01)


def test_pods_lists_the_worker_pods_for_the_cluster_view(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=2))
    emulator.put(PODS, f"{MAIN}-1", pending_unschedulable(f"{MAIN}-1"))
    emulator.put(PODS, f"{MAIN}-0", pod(f"{MAIN}-0"))
    assert make_launcher(emulator).pods() == [
        {
            "name": f"{MAIN}-0",
            "statefulset": MAIN,
            "phase": "Running",
            "ready": True,
            "node": "gpu-node-1",
            "reason": None,
        },
        {
            "name": f"{MAIN}-1",
            "statefulset": MAIN,
            "phase": "Pending",
            "ready": False,
            "node": None,
            "reason": f"Pending: Unschedulable: {UNSCHEDULABLE}",
        },
    ]
    assert emulator.requests() == [GET_STS, LIST_PODS]


# -- errors ------------------------------------------------------------------------------------------------------

FORBIDDEN = (
    'statefulsets.apps "atomo-workers" is forbidden: User "system:serviceaccount:atomo:atomo-control" cannot '
    'patch resource "statefulsets/scale" in API group "apps" in the namespace "atomo"'
)


@pytest.mark.parametrize(
    "status, reason, message, hint",
    [
        (
            403,
            "Forbidden",
            FORBIDDEN,
            "the control service's ServiceAccount is not allowed to; the chart's Role "
            "grants get statefulsets, patch statefulsets/scale, list pods and list events in this namespace",
        ),
        (
            409,
            "Conflict",
            'Operation cannot be fulfilled on statefulsets.apps "atomo-workers": the object has been modified',
            "another change to it was made at the same time; the next try may succeed",
        ),
        (500, "InternalError", "etcdserver: request timed out", "the API server failed"),
    ],
)
def test_api_errors_become_launch_errors_that_say_what_was_refused_and_why(emulator, status, reason, message, hint):
    """A refusal is final at once; a 5xx is tried 3 more times (the default `retries`) before it is."""
    emulator.put(STATEFULSETS, MAIN, statefulset())
    emulator.react(("patch", STATEFULSETS), kmock.KubernetesError(status=status, reason=reason, message=message))
    with pytest.raises(LaunchError) as failure:
        make_launcher(emulator).scale_for_run(2)
    text, tries = str(failure.value), 4 if status >= 500 else 1
    assert text.startswith(
        f"the Kubernetes API refused to scale StatefulSet {NS}/{MAIN} to 2 replicas: {status} {reason}: {message} "
        f"({hint})"
    )
    assert text.endswith(f"({hint})") if tries == 1 else re.search(rf"\({hint}\); tried 4 times in [0-9.]+ s$", text)
    assert TOKEN not in text
    assert failure.value.__cause__ is None  # raised `from None`: no client exception, headers or body passed on
    assert emulator.requests() == [scale_request(MAIN, 2)] * tries


def test_a_missing_statefulset_is_a_404_that_names_it(emulator):
    launcher = make_launcher(emulator)
    with pytest.raises(LaunchError) as failure:
        launcher.scale_for_run(1)
    text = str(failure.value)
    assert text.startswith(f"the Kubernetes API refused to scale StatefulSet {NS}/{MAIN} to 1 replicas: 404 ")
    assert text.endswith(
        f"(it does not exist in namespace {NS}: check ATOMO_K8S_NAMESPACE and "
        "ATOMO_K8S_WORKER_STATEFULSET/ATOMO_K8S_WORKER_STATEFULSETS)"
    )
    with pytest.raises(LaunchError, match=rf"refused to get StatefulSet {NS}/{MAIN}: 404 "):
        launcher.pods()


def test_a_forbidden_pod_list_in_a_timed_out_wait_is_reported_not_raised_as_an_api_error(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=1))
    emulator.react(("get", PODS), kmock.KubernetesError(status=403, reason="Forbidden", message="pods is forbidden"))
    with pytest.raises(LaunchError) as failure:
        make_launcher(emulator).wait_for_workers(1, lambda: 0, timeout_s=0.01)
    assert str(failure.value).startswith(
        "0 of 1 workers registered with the PS within 0.01 s; the Kubernetes API refused to list the pods of "
        f"StatefulSet {NS}/{MAIN}: 403 Forbidden: pods is forbidden (the control service's ServiceAccount"
    )


def test_forbidden_events_still_explain_the_pod(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=1))
    emulator.put(PODS, f"{MAIN}-0", pending_unschedulable(f"{MAIN}-0"))
    forbidden = kmock.KubernetesError(status=403, reason="Forbidden", message="events is forbidden")
    emulator.react(("get", EVENTS), forbidden)
    text = make_launcher(emulator).explain(1)
    assert text.startswith(
        f"pod {MAIN}-0 is Pending: Unschedulable: {UNSCHEDULABLE} (its events could not be read: "
        f"the Kubernetes API refused to list the events of Pod {NS}/{MAIN}-0: 403 Forbidden"
    )


def test_a_request_without_an_answer_times_out_as_a_launch_error(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset())

    async def never_in_time(request):
        await asyncio.sleep(1.0)
        return {}

    emulator.react(("patch", STATEFULSETS), never_in_time)
    with pytest.raises(LaunchError) as failure:
        make_launcher(emulator, timeout_s=0.2).scale_for_run(2)
    assert str(failure.value) == (
        f"could not scale StatefulSet {NS}/{MAIN} to 2 replicas: the Kubernetes API at {emulator.url} failed: "
        "no complete answer within 0.2 s"
    )
    assert emulator.requests() == [scale_request(MAIN, 2)]  # not sent again: the deadline is the request's budget


def test_a_refused_connection_is_a_launch_error(emulator):
    launcher = make_launcher(emulator)
    emulator.stop()
    with pytest.raises(LaunchError) as failure:
        launcher.scale_for_run(2)
    text = str(failure.value)
    assert text.startswith(
        f"could not scale StatefulSet {NS}/{MAIN} to 2 replicas: the Kubernetes API at {emulator.url} failed: "
    )
    assert re.search(
        r"failed: Failed to establish a new connection: \[Errno 111\] Connection refused; tried 4 times in [0-9.]+ s$",
        text,
    )
    with pytest.raises(LaunchError, match="Connection refused"):
        launcher.pods()


def status_reply(status: int, reason: str, message: str, retry_after: str | None = None):
    """A Kubernetes Status answer as the API server sends it with `status`, for an emulator reaction."""
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason}
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return kmock.Response(status=status, headers=headers, payload=body | {"code": status})


@pytest.mark.parametrize("retry_after", ["seconds", "date"])
def test_throttled_and_unavailable_requests_are_tried_again_after_retry_after_and_backoff(emulator, retry_after):
    """Retry-After as delta-seconds ("1") or as an HTTP date (2 s ahead, so at least 1 s once sent)."""
    emulator.put(STATEFULSETS, MAIN, statefulset())
    wait = "1" if retry_after == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    seen = {}  # id(request) -> (its place in order, when it came)

    def nth(n):
        return lambda request: seen.setdefault(id(request), (len(seen), time.monotonic()))[0] == n

    def react():
        throttled = status_reply(429, "TooManyRequests", "the server has received too many requests", wait)
        emulator.handler["patch", STATEFULSETS, nth(0)] << throttled
        emulator.handler["patch", STATEFULSETS, nth(1)] << status_reply(503, "ServiceUnavailable", "leader changed")

    emulator.call(react)  # the third request: the emulator itself answers
    assert make_launcher(emulator).scale_for_run(2) == {MAIN: 2}
    assert emulator.requests() == [scale_request(MAIN, 2)] * 3
    assert emulator.get(STATEFULSETS, MAIN)["spec"]["replicas"] == 2
    first, second = sorted(when for _, when in seen.values())[:2]
    assert second - first >= 0.9  # the 429's Retry-After (at least 1 s) was waited out, not the 10 ms backoff


def test_a_long_retry_after_is_capped_and_the_tries_are_bounded(emulator):
    emulator.put(STATEFULSETS, MAIN, statefulset())
    emulator.react(("get", STATEFULSETS), status_reply(429, "TooManyRequests", "slow down", retry_after="3600"))
    launcher = make_launcher(emulator, retries=2, max_retry_after_s=0.05)
    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(launcher.explain(1)), daemon=True)
    caller.start()
    caller.join(60)  # an hour's Retry-After, capped at 50 ms
    assert outcome, "the launcher waited out Retry-After: 3600"
    assert re.fullmatch(
        rf"the Kubernetes API refused to get StatefulSet {NS}/{MAIN}: 429 TooManyRequests: slow down \(the API "
        r"server is throttling requests; the next try may succeed\); tried 3 times in [0-9.]+ s",
        outcome[0],
    )
    assert emulator.requests() == [GET_STS] * 3


def test_a_connection_closed_without_an_answer_is_tried_again(raw_api):
    closed = []

    def answer(method, path):
        if "/statefulsets/" not in path:
            return 200, b'{"kind": "PodList", "items": []}', None
        if not closed:
            closed.append(path)
            return None  # the connection closes before any answer (an API server restarting)
        return 200, json.dumps(statefulset(replicas=1)).encode(), None

    api = raw_api(answer)
    assert make_launcher(api).pods() == []
    assert api.requests == [GET_STS, GET_STS, LIST_PODS]


@pytest.mark.parametrize("drip", ["head", "body"])
def test_an_answer_that_trickles_in_is_cut_off_at_the_requests_deadline(raw_api, drip):
    """A byte every 50 ms never trips the socket's timeout; the request's deadline (1 s) ends it all the same,
    once (a request without a complete answer is not sent again), and explain() says so instead of raising."""
    api = raw_api(lambda method, path: (200, json.dumps(statefulset(replicas=1)).encode(), drip))
    launcher = make_launcher(api, timeout_s=1.0)
    timed_out = (
        f"could not get StatefulSet {NS}/{MAIN}: the Kubernetes API at {api.url} failed: no complete answer within 1 s"
    )
    with pytest.raises(LaunchError) as failure:
        launcher.pods()
    assert str(failure.value) == timed_out
    assert api.requests == [GET_STS]
    wait_until(lambda: api.delivered, 10, "the server to see the connection shut")
    assert api.delivered == [False]  # cut off mid-answer, not read to the end
    assert launcher.explain(1) == timed_out
    assert api.requests == [GET_STS] * 2


@pytest.mark.parametrize("status", [200, 500, 403])
def test_a_reply_beyond_its_bound_is_refused_without_reading_it_whole(raw_api, status, monkeypatch):
    """A 2xx reply over MAX_REPLY_BYTES, or an error answer's body over MAX_ERROR_BYTES (which the client would
    otherwise read whole into its exception, bounded only by the deadline): a LaunchError saying so, at once
    and not tried again (a 500 is otherwise a transient failure); a body at the bound is read."""
    bound = 1 << 20 if status != 200 else 4 << 20
    if status == 200:
        monkeypatch.setattr(kubernetes_module, "MAX_REPLY_BYTES", bound)
    too_long = json.dumps({"kind": "Status", "message": "x" * bound}).encode()
    api = raw_api(lambda method, path: (status, too_long, None))
    launcher = make_launcher(api)
    with pytest.raises(LaunchError) as failure:
        launcher.pods()
    what = " (an error answer's body)" if status != 200 else ""
    assert str(failure.value) == (
        f"could not get StatefulSet {NS}/{MAIN}: the Kubernetes API's reply is longer than {bound} bytes{what}"
    )
    assert api.requests == [GET_STS]
    at_bound = {"kind": "Status", "reason": "Forbidden", "message": "m" * (bound - 200)}
    at_bound["message"] += "m" * (bound - len(json.dumps(at_bound)))
    if status == 403:  # an error body of exactly MAX_ERROR_BYTES is read and reported as the API error
        api = raw_api(lambda method, path: (403, json.dumps(at_bound).encode(), None))
        with pytest.raises(LaunchError, match=r"refused to get StatefulSet .*: 403 Forbidden: m{100}"):
            make_launcher(api).pods()


POD_0 = pod(f"{MAIN}-0")


@pytest.mark.parametrize(
    "reply, problem",
    [
        (b"[]", "is an array, not a JSON object"),
        (b"null", "is null, not a JSON object"),
        (b"", "is empty"),
        (b'{"items": [', "is not JSON"),
        (b'{"items": "atomo-workers-0"}', "has items as a string, not an array"),
        (b'{"items": [null]}', "has items[0] null or missing"),
        (b'{"items": [7]}', "has items[0] as a whole number, not an object"),
        (b'{"items": [{"metadata": {"labels": {}}}]}', "has items[0].metadata.name null or missing"),
        (
            json.dumps({"items": [POD_0 | {"status": {"conditions": "Ready"}}]}).encode(),
            "has items[0].status.conditions as a string, not an array",
        ),
        (
            json.dumps({"items": [POD_0 | {"status": {"containerStatuses": [{"state": {"waiting": 1}}]}}]}).encode(),
            "has items[0].status.containerStatuses[0].state.waiting as a whole number, not an object",
        ),
        (
            json.dumps({"items": [POD_0 | {"spec": {"nodeName": True}}]}).encode(),
            "has items[0].spec.nodeName as a boolean, not a string",
        ),
    ],
)
def test_a_pod_list_that_is_not_what_the_api_sends_is_a_launch_error(raw_api, reply, problem):
    def answer(method, path):
        return (200, json.dumps(statefulset(replicas=1)).encode() if "/statefulsets/" in path else reply, None)

    api = raw_api(answer)
    launcher = make_launcher(api)
    with pytest.raises(LaunchError) as failure:
        launcher.pods()
    assert str(failure.value) == (
        f"could not list the pods of StatefulSet {NS}/{MAIN}: the Kubernetes API's reply {problem}"
    )
    assert failure.value.__cause__ is None
    assert launcher.explain(1) == str(failure.value)  # never raises: the reason is the explanation
    assert api.requests == [GET_STS, LIST_PODS] * 2


@pytest.mark.parametrize(
    "reply, error",
    [
        (b"[]", f"could not get StatefulSet {NS}/{MAIN}: the Kubernetes API's reply is an array, not a JSON object"),
        (
            json.dumps(statefulset() | {"spec": {"selector": "app=atomo"}}).encode(),
            f"could not read StatefulSet {NS}/{MAIN}: the API's reply has spec.selector as a string, not an object",
        ),
        (
            json.dumps(statefulset() | {"spec": {"selector": {"matchExpressions": [{"operator": "Exists"}]}}}).encode(),
            f"could not read StatefulSet {NS}/{MAIN}: the API's reply has spec.selector.matchExpressions[0].key "
            "null or missing",
        ),
    ],
)
def test_a_statefulset_that_is_not_what_the_api_sends_is_a_launch_error(raw_api, reply, error):
    api = raw_api(lambda method, path: (200, reply, None))
    launcher = make_launcher(api)
    with pytest.raises(LaunchError, match=re.escape(error)):
        launcher.pods()
    assert launcher.explain(2) == error
    with pytest.raises(LaunchError, match=re.escape(error)):
        launcher.wait_for_workers(1, lambda: 0, timeout_s=0.01)
    assert api.requests == [GET_STS] * 3


def test_a_scale_answered_with_no_object_is_a_launch_error(raw_api):
    api = raw_api(lambda method, path: (200, b"null", None))
    with pytest.raises(LaunchError) as failure:
        make_launcher(api).scale_for_run(2)
    assert str(failure.value) == (
        f"could not scale StatefulSet {NS}/{MAIN} to 2 replicas: the Kubernetes API's reply is null, not a JSON object"
    )
    assert api.requests == [scale_request(MAIN, 2)]


# -- configuration -----------------------------------------------------------------------------------------------


def test_from_env_reads_the_charts_variables(emulator):
    env = {
        "ATOMO_K8S_NAMESPACE": NS,
        "ATOMO_K8S_WORKER_STATEFULSET": MAIN,
        "ATOMO_K8S_WORKER_STATEFULSETS": f"atomo-workers-h100=4, {MAIN}=2",
        "ATOMO_K8S_IDLE_REPLICAS": "1",
    }
    launcher = KubernetesLauncher.from_env(env, api_client=api_client(emulator.url))
    assert (launcher.namespace, launcher.idle_replicas) == (NS, 1)
    assert launcher.plan(5) == {MAIN: 2, "atomo-workers-h100": 3}  # the main group first

    only_main = KubernetesLauncher.from_env(
        {"ATOMO_K8S_NAMESPACE": NS, "ATOMO_K8S_WORKER_STATEFULSET": MAIN}, api_client=api_client(emulator.url)
    )
    assert (only_main.plan(7), only_main.idle_replicas) == ({MAIN: 7}, 0)

    for bad, why in [
        ({"ATOMO_K8S_NAMESPACE": NS}, "ATOMO_K8S_WORKER_STATEFULSET .* is not set"),
        (env | {"ATOMO_K8S_IDLE_REPLICAS": "two"}, "ATOMO_K8S_IDLE_REPLICAS='two': not a whole number"),
        (env | {"ATOMO_K8S_IDLE_REPLICAS": "7"}, "7 workers asked for, but the worker StatefulSets hold 6"),
        (env | {"ATOMO_K8S_NAMESPACE": "Not_A_Namespace"}, "not a valid namespace name"),
    ]:
        with pytest.raises(LaunchError, match=why):
            KubernetesLauncher.from_env(bad, api_client=api_client(emulator.url))


def test_outside_a_pod_the_default_in_cluster_configuration_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(LaunchError, match=r"no in-cluster Kubernetes configuration"):
        KubernetesLauncher(NS, [MAIN])


def test_importing_the_module_does_not_import_the_kubernetes_client():
    code = "import sys, services.control.kubernetes; assert 'kubernetes' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- least privilege ---------------------------------------------------------------------------------------------


def test_the_requests_the_launcher_sends_need_exactly_the_required_rules(emulator):
    """Every method, including a failed wait that reads events: the (apiGroup, resource, verb) set of the
    recorded requests is REQUIRED_RULES, all namespaced (the chart's Role is compared with REQUIRED_RULES)."""
    emulator.put(STATEFULSETS, MAIN, statefulset())
    emulator.put(PODS, f"{MAIN}-0", pending_unschedulable(f"{MAIN}-0"))
    launcher = make_launcher(emulator, idle=0)
    launcher.scale_for_run(2)
    with pytest.raises(LaunchError, match="StatefulSet atomo-workers has 1 of its 2 pods"):
        launcher.wait_for_workers(2, lambda: 0, timeout_s=0.01)
    launcher.pods()
    launcher.release()
    assert rbac_rules(emulator.requests()) == set(REQUIRED_RULES)
    assert {
        ("apps", "statefulsets", "get"),
        ("apps", "statefulsets/scale", "patch"),
        ("", "pods", "list"),
        ("", "events", "list"),
    } == REQUIRED_RULES
