"""The Kubernetes launcher: scale the worker StatefulSet(s) per run, wait for the workers, explain a failed wait.

The PS and the control service run as their own pods (the Helm chart `charts/atomo`); the workers are one or
more StatefulSets whose replicas this module sets. Before a run starts, `scale_for_run(workers)` scales them
to the run's `workers`; `wait_for_workers()` then polls the PS (through a callable) until that many workers
have registered, and on a timeout raises a `LaunchError` that names the pods that are not ready and why, as
the API reports it (a pod condition such as `Unschedulable: 0/3 nodes are available: 3 Insufficient
nvidia.com/gpu.`, a container's waiting or terminated reason, the pod's Warning events). `release()` scales
the workers back to `idle_replicas` once the queue is empty, so that idle GPUs go back to the cluster, and
`pods()` lists the worker pods for `GET /v1/cluster`.

Worker groups. `worker_statefulsets` lists every group, the main one first, each as `NAME` or `NAME=MAX`
(at most MAX replicas). A run's `workers` (and `idle_replicas`) fill the groups in that order: each group
takes as many as it can hold before the next one gets any, and a group without MAX holds any number. With
names only, the main group takes every worker and the other groups are scaled to 0. A count beyond what the
groups hold together is a `LaunchError`. The launcher owns the replicas of every listed StatefulSet.

Worker pods are found by the StatefulSet's own `spec.selector` (read from the StatefulSet, never assumed),
and only the pods whose controller (ownerReferences) is that StatefulSet count.

Every request this module sends, all in the one namespace (the chart's Role grants exactly these,
`REQUIRED_RULES`):

| apiGroup | resource           | verb  | request                                                                   |
|----------|--------------------|-------|---------------------------------------------------------------------------|
| apps     | statefulsets       | get   | GET /apis/apps/v1/namespaces/NS/statefulsets/NAME                         |
| apps     | statefulsets/scale | patch | PATCH /apis/apps/v1/namespaces/NS/statefulsets/NAME/scale,                |
|          |                    |       | `application/merge-patch+json`, body `{"spec": {"replicas": N}}`          |
| ""       | pods               | list  | GET /api/v1/namespaces/NS/pods?labelSelector=SELECTOR                     |
| ""       | events             | list  | GET /api/v1/namespaces/NS/events?fieldSelector=involvedObject.kind=KIND,  |
|          |                    |       | involvedObject.name=NAME  (only while explaining a failed wait)           |

Deadlines and retries. Each request has a total deadline of `request_timeout_s`, from sending it to the last
byte of the answer: an API server (or a proxy) that sends its answer a byte at a time is cut off there, its
connection shut. A request refused with 429 or a transient 5xx (500, 502, 503, 504), or whose connection was
refused or reset, is tried again up to `retries` more times, after a jittered exponential backoff (`backoff_s`
doubling up to `max_backoff_s`, each wait drawn between half and all of that) or the answer's Retry-After
when longer, capped at `max_retry_after_s`. A request without a complete answer by its deadline is not sent
again, so that the deadline bounds it. Every request is idempotent (a GET, or a merge patch that sets
replicas), so sending one again is safe.

Errors. Every failure is a `LaunchError` whose message says what was refused or unreachable and why: an
API error (401, 403, 404, 409, 422, 429, 5xx: the status, the API's reason and message, a hint, and how
many tries it took), a request that got no complete answer within `request_timeout_s`, a refused connection,
a reply that is not what the API sends (not a JSON object, `items` not a list, a pod without a name, a field
of the wrong type, more than `MAX_REPLY_BYTES`, or an error answer's body over `MAX_ERROR_BYTES`), a missing
in-cluster configuration. Nothing from the
client's exceptions is passed on (no headers, no credentials). `explain()` never raises.

The `kubernetes` package is an optional dependency: it is imported only when a launcher is built.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import itertools
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("atomo.control")

ENV_NAMESPACE = "ATOMO_K8S_NAMESPACE"
ENV_WORKER_STATEFULSET = "ATOMO_K8S_WORKER_STATEFULSET"
ENV_WORKER_STATEFULSETS = "ATOMO_K8S_WORKER_STATEFULSETS"
ENV_IDLE_REPLICAS = "ATOMO_K8S_IDLE_REPLICAS"
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# (apiGroup, resource, verb): every request this module can send; the chart's Role grants exactly these.
REQUIRED_RULES = frozenset(
    {
        ("apps", "statefulsets", "get"),
        ("apps", "statefulsets/scale", "patch"),
        ("", "pods", "list"),
        ("", "events", "list"),
    }
)

DEFAULT_REQUEST_TIMEOUT_S = 10.0  # the total deadline of one request, first byte sent to last byte read
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_RETRIES = 3  # more tries of a request refused with RETRY_STATUSES or whose connection failed
DEFAULT_BACKOFF_S = 0.5  # the first wait before trying again; it doubles each time, up to the next
DEFAULT_MAX_BACKOFF_S = 8.0
DEFAULT_MAX_RETRY_AFTER_S = 30.0  # the longest wait a Retry-After header gets
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_REPLY_BYTES = 32 << 20  # a longer reply is refused (a pod list of thousands of pods is a few MiB)
MAX_ERROR_BYTES = 1 << 20  # a longer body of an error answer (a Status object: about 1 KB) is refused
MAX_PODS_EXPLAINED = 5  # a failed wait names at most this many pods (and counts the rest)
MAX_EVENTS_PER_OBJECT = 2  # the newest distinct Warning events quoted per pod or StatefulSet
MAX_API_MESSAGE_CHARS = 500

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS-1123 label (namespace, StatefulSet name)


class LaunchError(RuntimeError):
    """The workers could not be scaled, listed or waited for; the message says what and why."""


@dataclass(frozen=True)
class WorkerGroup:
    """A worker StatefulSet and the most replicas it may be given (None: any number)."""

    name: str
    max_replicas: int | None = None


def parse_groups(entries: Sequence[str]) -> list[WorkerGroup]:
    """`["NAME", "NAME=MAX", ...]` -> groups in that order; LaunchError on a bad name, MAX or duplicate."""
    groups: list[WorkerGroup] = []
    for entry in entries:
        name, _, cap = entry.strip().partition("=")
        name = name.strip()
        if not _NAME.match(name) or len(name) > 63:
            raise LaunchError(f"worker StatefulSet {entry!r}: not a valid name (lowercase letters, digits and '-')")
        max_replicas = None
        if cap.strip():
            try:
                max_replicas = int(cap)
            except ValueError:
                max_replicas = -1
            if max_replicas < 0:
                raise LaunchError(f"worker StatefulSet {entry!r}: MAX must be a whole number >= 0")
        if any(group.name == name for group in groups):
            raise LaunchError(f"worker StatefulSet {name!r} is listed twice")
        groups.append(WorkerGroup(name, max_replicas))
    if not groups:
        raise LaunchError("no worker StatefulSet given")
    return groups


def split_workers(groups: Sequence[WorkerGroup], count: int) -> dict[str, int]:
    """Replicas per group for `count` workers: fill the groups in order, each up to its MAX."""
    plan, left = {}, count
    for group in groups:
        take = left if group.max_replicas is None else min(left, group.max_replicas)
        plan[group.name] = take
        left -= take
    if left > 0:
        held = ", ".join(f"{g.name} at most {g.max_replicas}" for g in groups)
        raise LaunchError(f"{count} workers asked for, but the worker StatefulSets hold {count - left} ({held})")
    return plan


def label_selector(selector: Mapping[str, Any] | None) -> str:
    """A LabelSelector object (matchLabels, matchExpressions) as the `labelSelector` query string."""
    selector = selector or {}
    terms = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or [])
        terms.append(
            {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key}.get(op, f"!{key}")
        )
    return ",".join(terms)


class KubernetesLauncher:
    """Scales the worker StatefulSet(s) of one namespace per run; see the module's doc.

    `worker_statefulsets`: the groups, main first, each `NAME` or `NAME=MAX`. `api_client`: a
    `kubernetes.client.ApiClient`; None loads the in-cluster configuration (the pod's ServiceAccount). The
    launcher takes over its connection pool: each request keeps its deadline there, and urllib3's own retries
    are off (the launcher retries, see the module's doc). `request_timeout_s`: the total deadline of each API
    request; `retries`, `backoff_s`, `max_backoff_s`, `max_retry_after_s`: how a transient failure is tried
    again. Thread-safe: it keeps no state between calls.
    """

    def __init__(
        self,
        namespace: str,
        worker_statefulsets: Sequence[str],
        idle_replicas: int = 0,
        api_client: Any = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S,
    ):
        if not _NAME.match(namespace or "") or len(namespace) > 63:
            raise LaunchError(f"namespace {namespace!r}: not a valid namespace name")
        self.namespace = namespace
        self.groups = parse_groups(worker_statefulsets)
        if idle_replicas < 0:
            raise LaunchError(f"idle replicas must be >= 0, not {idle_replicas}")
        self.idle_replicas = idle_replicas
        split_workers(self.groups, idle_replicas)  # fails now if the groups cannot hold the idle replicas
        if not request_timeout_s > 0 or retries < 0 or min(backoff_s, max_backoff_s, max_retry_after_s) < 0:
            raise LaunchError(
                "the request timeout must be > 0, and the retries, backoffs and Retry-After cap >= 0 "
                f"(not {request_timeout_s}, {retries}, {backoff_s}, {max_backoff_s}, {max_retry_after_s})"
            )
        self.request_timeout_s = request_timeout_s
        self.poll_interval_s = poll_interval_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        try:
            from kubernetes import client
        except ImportError as exc:
            raise LaunchError(
                "the Kubernetes launcher needs the `kubernetes` package (pip install 'atomo[kubernetes]')"
            ) from exc
        if api_client is None:
            api_client = _in_cluster_client()
        self.api_client = api_client
        _keep_deadlines(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, api_client: Any = None, **options: Any
    ) -> KubernetesLauncher:
        """A launcher configured as the chart configures the control service:

        ATOMO_K8S_NAMESPACE (default: the pod's own namespace, from its ServiceAccount),
        ATOMO_K8S_WORKER_STATEFULSET (the main group, required), ATOMO_K8S_WORKER_STATEFULSETS (every group,
        comma-separated, each NAME or NAME=MAX; the main group goes first whatever its place here),
        ATOMO_K8S_IDLE_REPLICAS (default 0). `options` go to the constructor.
        """
        env = os.environ if environ is None else environ
        namespace = env.get(ENV_NAMESPACE, "").strip()
        if not namespace:
            try:
                with open(SERVICE_ACCOUNT_NAMESPACE_FILE) as f:
                    namespace = f.read().strip()
            except OSError:
                raise LaunchError(
                    f"{ENV_NAMESPACE} is not set and this is not a pod ({SERVICE_ACCOUNT_NAMESPACE_FILE} is missing)"
                ) from None
        main = env.get(ENV_WORKER_STATEFULSET, "").strip()
        if not main:
            raise LaunchError(f"{ENV_WORKER_STATEFULSET} (the worker StatefulSet's name) is not set")
        entries = [e.strip() for e in env.get(ENV_WORKER_STATEFULSETS, "").split(",") if e.strip()]
        main_entries = [e for e in entries if e.partition("=")[0].strip() == main] or [main]
        entries = main_entries[:1] + [e for e in entries if e.partition("=")[0].strip() != main]
        raw_idle = env.get(ENV_IDLE_REPLICAS, "0").strip() or "0"
        try:
            idle = int(raw_idle)
        except ValueError:
            raise LaunchError(f"{ENV_IDLE_REPLICAS}={raw_idle!r}: not a whole number") from None
        return cls(namespace, entries, idle_replicas=idle, api_client=api_client, **options)

    # -- the interface ---------------------------------------------------------------------------------------

    def plan(self, workers: int) -> dict[str, int]:
        """Replicas per StatefulSet for `workers` workers (the module's doc says how they are split)."""
        return split_workers(self.groups, workers)

    def scale_for_run(self, workers: int) -> dict[str, int]:
        """Scale the worker StatefulSet(s) to `workers` in all; returns the replicas set per StatefulSet."""
        plan = self.plan(workers)
        for name, replicas in plan.items():
            self._scale(name, replicas)
        return plan

    def release(self) -> dict[str, int]:
        """Scale the worker StatefulSet(s) back to `idle_replicas` in all (the queue is empty)."""
        plan = self.plan(self.idle_replicas)
        for name, replicas in plan.items():
            self._scale(name, replicas)
        return plan

    def wait_for_workers(
        self,
        count: int,
        live_workers: Callable[[], int],
        timeout_s: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> bool:
        """Poll `live_workers()` (the workers registered with the PS) every `poll_interval_s` until it reports
        at least `count`: True then, False as soon as `cancelled()` is true. After `timeout_s` a LaunchError
        says how many registered and which pods are not ready and why (`explain`). An exception from
        `live_workers` counts as no worker yet; its message is kept for the error."""
        deadline = time.monotonic() + timeout_s
        live, why_unknown = 0, None
        while True:
            try:
                live, why_unknown = int(live_workers()), None
            except Exception as exc:  # the PS not answering this once: keep waiting, remember why
                live, why_unknown = 0, f"{type(exc).__name__}: {exc}"
            if live >= count:
                return True
            if cancelled is not None and cancelled():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(self.poll_interval_s, remaining))
        counted = f"{live} of {count} workers registered with the PS within {timeout_s:g} s"
        if why_unknown:
            counted += f" (the PS could not be asked: {why_unknown})"
        raise LaunchError(f"{counted}; {self.explain(count)}")

    def explain(self, count: int) -> str:
        """Why `count` workers are not all up, as the API reports it: for each StatefulSet of `plan(count)`,
        missing pods (with the StatefulSet's Warning events) and pods that are not ready (phase, conditions,
        containers' reasons, Warning events). Never raises: an API failure or a reply that is not what the API
        sends becomes part of the text."""
        try:
            return self._explain(count)
        except Exception as exc:  # a bug here must not hide why the workers are missing: say what is known
            log.exception("could not explain the missing workers")
            return f"the worker pods could not be examined ({type(exc).__name__}: {exc})"

    def _explain(self, count: int) -> str:
        try:
            plan = self.plan(count)
        except LaunchError as exc:
            return str(exc)
        problems: list[str] = []
        explained = 0
        for name, replicas in plan.items():
            if replicas == 0:
                continue
            try:
                pods = self._pods_of(name, self._get_statefulset(name))
            except LaunchError as exc:
                problems.append(str(exc))
                continue
            wanted = {f"{name}-{i}" for i in range(replicas)}
            present = [p for p in pods if p["metadata"]["name"] in wanted]
            if len(present) < replicas:
                text = f"StatefulSet {name} has {len(present)} of its {replicas} pods"
                problems.append(text + self._events_text("StatefulSet", name, text))
            for pod in present:
                if _pod_ready(pod):
                    continue
                explained += 1
                if explained > MAX_PODS_EXPLAINED:
                    continue
                text = f"pod {pod['metadata']['name']} is {_pod_state(pod)}"
                problems.append(text + self._events_text("Pod", pod["metadata"]["name"], text))
        if explained > MAX_PODS_EXPLAINED:
            problems.append(f"{explained - MAX_PODS_EXPLAINED} more pods are not ready")
        if not problems:
            return (
                "every worker pod is running and ready, so the workers did not reach the PS: see their logs "
                f"(kubectl logs -n {self.namespace} POD)"
            )
        return "; ".join(problems)

    def pods(self) -> list[dict]:
        """Every worker pod: `name`, `statefulset`, `phase`, `ready`, `node`, `reason` (None when ready),
        ordered by StatefulSet and ordinal. Raises LaunchError when the API refuses, does not answer in time or
        answers with something else than the objects it sends."""
        out = []
        for group in self.groups:
            for pod in self._pods_of(group.name, self._get_statefulset(group.name)):
                ready = _pod_ready(pod)
                out.append(
                    {
                        "name": pod["metadata"]["name"],
                        "statefulset": group.name,
                        "phase": (pod.get("status") or {}).get("phase") or "Unknown",
                        "ready": ready,
                        "node": (pod.get("spec") or {}).get("nodeName"),
                        "reason": None if ready else _pod_state(pod),
                    }
                )
        return out

    # -- requests ----------------------------------------------------------------------------------------------

    def _scale(self, name: str, replicas: int) -> None:
        self._call(
            f"scale StatefulSet {self.namespace}/{name} to {replicas} replicas",
            self._apps.patch_namespaced_stateful_set_scale,
            name,
            self.namespace,
            {"spec": {"replicas": replicas}},
            _content_type="application/merge-patch+json",
        )

    def _get_statefulset(self, name: str) -> dict:
        return self._call(
            f"get StatefulSet {self.namespace}/{name}", self._apps.read_namespaced_stateful_set, name, self.namespace
        )

    def _pods_of(self, name: str, sts: dict) -> list[dict]:
        """The pods that StatefulSet `name` (`sts`, as read) controls, by its selector and their
        ownerReferences, ordered by ordinal; each checked to have the shape this module reads."""
        problem = _shape_error(sts, {"spec": {"selector": _SELECTOR}}, "")
        if problem:
            raise LaunchError(f"could not read StatefulSet {self.namespace}/{name}: the API's reply has {problem}")
        selector = label_selector((sts.get("spec") or {}).get("selector"))
        if not selector:
            raise LaunchError(f"StatefulSet {self.namespace}/{name} has no spec.selector, so its pods cannot be found")
        what = f"list the pods of StatefulSet {self.namespace}/{name}"
        listed = self._call(what, self._core.list_namespaced_pod, self.namespace, label_selector=selector)
        pods = [p for p in _items(listed, _POD, what) if _controlled_by(p, "StatefulSet", name)]
        return sorted(pods, key=lambda p: _ordinal(p["metadata"]["name"]))

    def _events_text(self, kind: str, name: str, already: str) -> str:
        """`; events: REASON: MESSAGE, ...`: the object's newest distinct Warning events that `already` does
        not quote; a failure to list them is said instead."""
        what = f"list the events of {kind} {self.namespace}/{name}"
        try:
            listed = self._call(
                what,
                self._core.list_namespaced_event,
                self.namespace,
                field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
            )
            items = _items(listed, _EVENT, what)
        except LaunchError as exc:
            return f" (its events could not be read: {exc})"
        events = [
            e for e in items if e.get("type") == "Warning" and (e.get("involvedObject") or {}).get("name") == name
        ]
        events.sort(key=_event_time)
        quoted: list[str] = []
        for event in reversed(events):  # newest first
            message = (event.get("message") or "").strip()
            text = f"{event.get('reason') or 'Warning'}: {message}" if message else str(event.get("reason"))
            if message and message in already or text in quoted:
                continue
            quoted.append(text)
            if len(quoted) == MAX_EVENTS_PER_OBJECT:
                break
        return f" (events: {'; '.join(quoted)})" if quoted else ""

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict:
        """One API request, tried again after a transient failure (the module's doc says which and how), its
        JSON reply as a dict; any failure -> LaunchError naming `what` and why."""
        started = time.monotonic()
        for tries in itertools.count(1):
            try:
                return self._request(what, method, args, kwargs)
            except _Transient as failure:
                if tries > self.retries:
                    spent = time.monotonic() - started
                    tried = f"; tried {tries} times in {spent:.1f} s" if tries > 1 else ""
                    raise LaunchError(f"{failure}{tried}") from None
                delay = self._backoff(tries, failure.retry_after)
                log.warning("%s; trying again in %.1f s", failure, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, tries: int, retry_after: float | None) -> float:
        """The wait before try `tries` + 1: jittered exponential, or the server's Retry-After (capped)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    def _request(self, what: str, method: Callable[..., Any], args: tuple, kwargs: dict) -> dict:
        """One try of `method` within the deadline; _Transient for a failure worth trying again."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError
        from urllib3.exceptions import TimeoutError as Urllib3Timeout

        failed = f"could not {what}: the Kubernetes API at {self._host()} failed"
        timed_out = f"{failed}: no complete answer within {self.request_timeout_s:g} s"
        deadline = _Deadline(self.request_timeout_s)
        try:
            with deadline:
                response = method(*args, _preload_content=False, _request_timeout=self.request_timeout_s, **kwargs)
                data = _read_reply(response)
        except ApiException as exc:
            if deadline.expired:
                raise LaunchError(timed_out) from None
            text = self._api_error(what, exc)
            if exc.status in RETRY_STATUSES:
                raise _Transient(text, _retry_after(exc.headers)) from None
            raise LaunchError(text) from None
        except Exception as exc:  # the client's and urllib3's failures, whatever their type: none is passed on
            reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
            # NewConnectionError (e.g. connection refused) is also a TimeoutError in urllib3 2
            if deadline.expired or isinstance(reason, Urllib3Timeout) and not isinstance(reason, NewConnectionError):
                raise LaunchError(timed_out) from None
            if isinstance(reason, _TooLong):
                raise LaunchError(f"could not {what}: the Kubernetes API's reply is longer than {reason}") from None
            transient = isinstance(reason, NewConnectionError | ProtocolError | ConnectionError)  # refused, reset
            if isinstance(reason, ProtocolError) and len(reason.args) == 2:  # ('Connection aborted.', its cause)
                what_broke, cause = (str(arg) for arg in reason.args)
                reason = what_broke if cause in what_broke else f"{what_broke.rstrip('.')}: {cause}"
            detail = re.sub(r"^(<[^>]*>|\w+\([^)]*\)): ", "", str(reason)) or type(reason).__name__
            raise (_Transient if transient else LaunchError)(f"{failed}: {detail}") from None
        if deadline.expired:  # cut off mid-answer: what was read is not the whole reply
            raise LaunchError(timed_out)
        if not data:
            raise LaunchError(f"could not {what}: the Kubernetes API's reply is empty")
        try:
            reply = json.loads(data)
        except ValueError:
            raise LaunchError(f"could not {what}: the Kubernetes API's reply is not JSON") from None
        if not isinstance(reply, dict):
            raise LaunchError(f"could not {what}: the Kubernetes API's reply is {_kind(reply)}, not a JSON object")
        return reply

    def _api_error(self, what: str, exc: Any) -> str:
        status = exc.status
        reason, message = exc.reason, ""
        try:
            body = json.loads(exc.body or "")
            if isinstance(body, dict):
                reason, message = body.get("reason") or reason, body.get("message") or ""
        except ValueError:
            pass
        if status == 0:  # the client's own failure (e.g. TLS), not an HTTP status
            return f"could not {what}: the Kubernetes API at {self._host()} failed: {reason}"
        reason, message = str(reason)[:MAX_API_MESSAGE_CHARS], str(message)[:MAX_API_MESSAGE_CHARS]
        hint = {
            401: "the control service's credentials were rejected",
            403: "the control service's ServiceAccount is not allowed to; the chart's Role grants get "
            "statefulsets, patch statefulsets/scale, list pods and list events in this namespace",
            404: f"it does not exist in namespace {self.namespace}: check {ENV_NAMESPACE} and "
            f"{ENV_WORKER_STATEFULSET}/{ENV_WORKER_STATEFULSETS}",
            409: "another change to it was made at the same time; the next try may succeed",
            422: "the API found the request invalid",
            429: "the API server is throttling requests; the next try may succeed",
        }.get(status, "the API server failed" if status and status >= 500 else "")
        text = f"the Kubernetes API refused to {what}: {status} {reason}"
        text += f": {message}" if message else ""
        return text + (f" ({hint})" if hint else "")

    def _host(self) -> str:
        return getattr(getattr(self.api_client, "configuration", None), "host", "?")


def _in_cluster_client() -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as exc:
        raise LaunchError(
            f"no in-cluster Kubernetes configuration (is this a pod with a ServiceAccount?): {exc}"
        ) from None
    return client.ApiClient(configuration)


class _Transient(LaunchError):
    """A failure that the next try may not have: 429, a transient 5xx, a refused or reset connection."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _TooLong(ValueError):
    """A reply longer than MAX_REPLY_BYTES."""


class _Deadline:
    """`with _Deadline(seconds):` shuts the sockets of the requests this thread sends inside the block once
    `seconds` have passed, so that a reply that trickles in cannot hold the request past its deadline (the
    socket timeout only bounds each wait for a byte); `expired` says it did. A request sent after the
    deadline fails at once. The connections learn the deadline from `_keep_deadlines`."""

    _current = threading.local()

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._connections: list | None = []  # None once the block is left
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _Deadline._current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._connections = None
        _Deadline._current.deadline = None

    @classmethod
    def track(cls, connection: Any) -> bool:
        """A connection of this thread sends a request: False if the deadline has passed, else it is watched."""
        deadline = getattr(cls._current, "deadline", None)
        if deadline is None:
            return True
        with deadline._lock:
            if deadline.expired:
                return False
            if deadline._connections is not None:
                deadline._connections.append(connection)
        return True

    def _expire(self) -> None:
        with self._lock:
            if self._connections is None:
                return
            self.expired = True
            connections = list(self._connections)
        for connection in connections:
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):  # the plain socket's shutdown, also for TLS: the reader gets EOF
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _keep_deadlines(api_client: Any) -> None:
    """Make `api_client`'s connections keep each request's `_Deadline`, and switch off urllib3's retries
    (the launcher's own retries back off; urllib3's would send a timed-out GET again)."""
    manager = api_client.rest_client.pool_manager
    manager.pool_classes_by_scheme = {
        scheme: _deadline_pool(pool) for scheme, pool in manager.pool_classes_by_scheme.items()
    }
    manager.connection_pool_kw["retries"] = False
    manager.clear()  # pools made before this keep neither


@functools.cache
def _deadline_pool(pool: type) -> type:
    """A subclass of the urllib3 connection pool `pool` whose connections report to `_Deadline.track`."""
    if getattr(pool, "keeps_deadlines", False):
        return pool

    class Connection(pool.ConnectionCls):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            if not _Deadline.track(self):
                raise ConnectionAbortedError("the request's deadline has passed")
            return super().request(*args, **kwargs)

    def urlopen(self, *args: Any, **kwargs: Any) -> Any:
        response = pool.urlopen(self, *args, **kwargs)
        if 200 <= response.status <= 299 or kwargs.get("preload_content", True):
            return response
        return _bounded_error(response)

    attributes = {"ConnectionCls": Connection, "keeps_deadlines": True, "urlopen": urlopen}
    return type(f"Deadline{pool.__name__}", (pool,), attributes)


def _bounded_error(response: Any) -> Any:
    """An error answer (not 2xx) with its body read here, at most MAX_ERROR_BYTES (_TooLong beyond): the
    client would read it whole into its exception, bounded only by the request's deadline."""
    from urllib3 import HTTPResponse

    body = response.read(MAX_ERROR_BYTES + 1)
    if len(body) > MAX_ERROR_BYTES:
        response.close()  # not back to the pool: the rest of the body is still on the connection
        raise _TooLong(f"{MAX_ERROR_BYTES} bytes (an error answer's body)")
    response.release_conn()
    return HTTPResponse(
        body=body, headers=response.headers, status=response.status, reason=response.reason, preload_content=False
    )


def _read_reply(response: Any) -> bytes:
    """The body of a urllib3 response, at most MAX_REPLY_BYTES (_TooLong beyond)."""
    data = response.read(MAX_REPLY_BYTES + 1)
    if len(data) > MAX_REPLY_BYTES:
        response.close()  # not back to the pool: the rest of the reply is still on the connection
        raise _TooLong(f"{MAX_REPLY_BYTES} bytes")
    response.release_conn()
    return data


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = str((headers or {}).get("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo is not None else None


# -- the shape of replies ---------------------------------------------------------------------------------------
# A shape is a type, {field: shape} for an object (the key `str`: every field), [shape] for an array, or
# _Required(shape). Fields that are missing or null pass unless required; only the fields this module reads
# are described.


@dataclass(frozen=True)
class _Required:
    shape: Any


_CONDITION = {"type": str, "status": str, "reason": str, "message": str}
_TERMINATED = {"exitCode": int, "reason": str}
_CONTAINER = {
    "name": str,
    "state": {"waiting": {"reason": str, "message": str}, "terminated": _TERMINATED},
    "lastState": {"terminated": _TERMINATED},
}
_POD = {
    "metadata": _Required(
        {
            "name": _Required(str),
            "deletionTimestamp": str,
            "ownerReferences": [{"kind": str, "name": str, "controller": bool}],
        }
    ),
    "spec": {"nodeName": str},
    "status": {
        "phase": str,
        "reason": str,
        "message": str,
        "conditions": [_CONDITION],
        "containerStatuses": [_CONTAINER],
        "initContainerStatuses": [_CONTAINER],
    },
}
_EVENT = {
    "type": str,
    "reason": str,
    "message": str,
    "involvedObject": {"name": str},
    "lastTimestamp": str,
    "eventTime": str,
    "metadata": {"creationTimestamp": str},
}
_SELECTOR = {
    "matchLabels": {str: str},
    "matchExpressions": [{"key": _Required(str), "operator": _Required(str), "values": [str]}],
}
_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a whole number",
    float: "a number",
}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


def _shape_error(value: Any, shape: Any, where: str) -> str | None:
    """`FIELD as KIND, not KIND` (or `FIELD null or missing`) where `value` first departs from `shape`."""
    if isinstance(shape, _Required):
        if value is None:
            return f"{where} null or missing"
        shape = shape.shape
    if value is None:
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} as {_kind(value)}, not an object"
        fields = value.items() if str in shape else ((key, value.get(key)) for key in shape)
        for key, field in fields:
            problem = _shape_error(field, shape.get(str, shape.get(key)), f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} as {_kind(value)}, not an array"
        for i, item in enumerate(value):
            problem = _shape_error(item, _Required(shape[0]), f"{where}[{i}]")
            if problem:
                return problem
        return None
    if not isinstance(value, shape) or isinstance(value, bool) and shape is not bool:
        return f"{where} as {_kind(value)}, not {_KINDS[shape]}"
    return None


def _items(listed: dict, shape: Any, what: str) -> list[dict]:
    """The `items` of a list reply, each checked against `shape`; LaunchError naming the first misfit."""
    problem = _shape_error(listed.get("items"), [shape], "items")
    if problem:
        raise LaunchError(f"could not {what}: the Kubernetes API's reply has {problem}")
    return listed.get("items") or []


def _controlled_by(pod: dict, kind: str, name: str) -> bool:
    return any(
        ref.get("controller") and ref.get("kind") == kind and ref.get("name") == name
        for ref in (pod.get("metadata") or {}).get("ownerReferences") or []
    )


def _ordinal(pod_name: str) -> tuple[int, str]:
    head, _, tail = pod_name.rpartition("-")
    return (int(tail), head) if tail.isdigit() else (1 << 30, pod_name)


def _event_time(event: dict) -> str:
    return (
        event.get("lastTimestamp")
        or event.get("eventTime")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


def _pod_ready(pod: dict) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _pod_state(pod: dict) -> str:
    """`Pending: Unschedulable: 0/3 nodes are available: ...`, `Running, not ready: container worker
    CrashLoopBackOff (last exit code 1)`, `terminating`: the phase and what the API says stops the pod."""
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "terminating"
    phase = status.get("phase") or "Unknown"
    reasons = []
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        reasons.append(_reason_text(scheduled.get("reason") or "not scheduled", scheduled.get("message")))
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = container.get("state") or {}
        waiting, terminated = state.get("waiting"), state.get("terminated")
        if waiting:
            why = _reason_text(waiting.get("reason") or "waiting", waiting.get("message"))
            text = f"container {container.get('name')} {why}"
            last = (container.get("lastState") or {}).get("terminated")
            if last and last.get("exitCode") is not None:
                text += f" (last exit code {last['exitCode']}{', ' + last['reason'] if last.get('reason') else ''})"
            reasons.append(text)
        elif terminated and terminated.get("exitCode") != 0:
            reasons.append(
                f"container {container.get('name')} terminated "
                f"({terminated.get('reason') or 'error'}, exit code {terminated.get('exitCode')})"
            )
    if not reasons and phase == "Running":
        ready = conditions.get("Ready") or {}
        reasons.append(_reason_text(ready.get("reason") or "not ready", ready.get("message")))
    head = phase if phase != "Running" else "Running, not ready"
    if not reasons and status.get("reason"):
        reasons.append(_reason_text(status["reason"], status.get("message")))
    return f"{head}: {'; '.join(reasons)}" if reasons else head


def _reason_text(reason: str, message: str | None) -> str:
    message = (message or "").strip()[:MAX_API_MESSAGE_CHARS]
    return f"{reason}: {message}" if message else reason
