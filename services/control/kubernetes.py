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

Errors. Every failure is a `LaunchError` whose message says what was refused or unreachable and why: an
API error (401, 403, 404, 409, 422, 429, 5xx: the status, the API's reason and message, and a hint), a
request that got no answer within `request_timeout_s`, a refused connection, a missing in-cluster
configuration. Nothing from the client's exceptions is passed on (no headers, no credentials).

The `kubernetes` package is an optional dependency: it is imported only when a launcher is built.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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

DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_POLL_INTERVAL_S = 1.0
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
    `kubernetes.client.ApiClient`; None loads the in-cluster configuration (the pod's ServiceAccount).
    `request_timeout_s`: how long each API request may take. Thread-safe: it keeps no state between calls.
    """

    def __init__(
        self,
        namespace: str,
        worker_statefulsets: Sequence[str],
        idle_replicas: int = 0,
        api_client: Any = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ):
        if not _NAME.match(namespace or "") or len(namespace) > 63:
            raise LaunchError(f"namespace {namespace!r}: not a valid namespace name")
        self.namespace = namespace
        self.groups = parse_groups(worker_statefulsets)
        if idle_replicas < 0:
            raise LaunchError(f"idle replicas must be >= 0, not {idle_replicas}")
        self.idle_replicas = idle_replicas
        split_workers(self.groups, idle_replicas)  # fails now if the groups cannot hold the idle replicas
        self.request_timeout_s = request_timeout_s
        self.poll_interval_s = poll_interval_s
        try:
            from kubernetes import client
        except ImportError as exc:
            raise LaunchError(
                "the Kubernetes launcher needs the `kubernetes` package (pip install 'atomo[kubernetes]')"
            ) from exc
        if api_client is None:
            api_client = _in_cluster_client()
        self.api_client = api_client
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
        containers' reasons, Warning events). Never raises: an API failure becomes part of the text."""
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
                sts = self._get_statefulset(name)
                pods = self._pods_of(sts)
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
        ordered by StatefulSet and ordinal. Raises LaunchError when the API refuses or does not answer."""
        out = []
        for group in self.groups:
            for pod in self._pods_of(self._get_statefulset(group.name)):
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

    def _pods_of(self, sts: dict) -> list[dict]:
        """The pods that `sts` controls, by its selector and their ownerReferences, ordered by ordinal."""
        name = sts["metadata"]["name"]
        selector = label_selector((sts.get("spec") or {}).get("selector"))
        if not selector:
            raise LaunchError(f"StatefulSet {self.namespace}/{name} has no spec.selector, so its pods cannot be found")
        listed = self._call(
            f"list the pods of StatefulSet {self.namespace}/{name}",
            self._core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
        )
        pods = [p for p in listed.get("items") or [] if _controlled_by(p, "StatefulSet", name)]
        return sorted(pods, key=lambda p: _ordinal(p["metadata"]["name"]))

    def _events_text(self, kind: str, name: str, already: str) -> str:
        """`; events: REASON: MESSAGE, ...`: the object's newest distinct Warning events that `already` does
        not quote; a failure to list them is said instead."""
        try:
            listed = self._call(
                f"list the events of {kind} {self.namespace}/{name}",
                self._core.list_namespaced_event,
                self.namespace,
                field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
            )
        except LaunchError as exc:
            return f" (its events could not be read: {exc})"
        events = [
            e
            for e in listed.get("items") or []
            if e.get("type") == "Warning" and (e.get("involvedObject") or {}).get("name") == name
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
        """One API request, its JSON reply as a dict; any failure -> LaunchError naming `what` and why."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError
        from urllib3.exceptions import TimeoutError as Urllib3Timeout

        try:
            response = method(*args, _preload_content=False, _request_timeout=self.request_timeout_s, **kwargs)
            data = response.data
        except ApiException as exc:
            raise LaunchError(self._api_error(what, exc)) from None
        except (HTTPError, OSError) as exc:
            reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
            # NewConnectionError (e.g. connection refused) is also a TimeoutError in urllib3 2
            if isinstance(reason, Urllib3Timeout) and not isinstance(reason, NewConnectionError):
                detail = f"no answer within {self.request_timeout_s:g} s"
            else:  # without urllib3's prefix naming the connection object
                detail = re.sub(r"^(<[^>]*>|\w+\([^)]*\)): ", "", str(reason))
            raise LaunchError(f"could not {what}: the Kubernetes API at {self._host()} failed: {detail}") from None
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise LaunchError(f"could not {what}: the Kubernetes API's reply is not JSON") from None

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
        message = message[:MAX_API_MESSAGE_CHARS]
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
