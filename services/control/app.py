"""The REST API of the control service: runs, their metrics, events and checkpoints, and the cluster."""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.common.metrics import CONTROL_METRICS, create
from services.common.ps_client import PSClient, PSError, PSUnavailable
from services.common.spec import RunSpec
from services.control import artifacts, docs, errors
from services.control.auth import bearer_dependency
from services.control.errors import ApiError, ErrorBody
from services.control.middleware import BodyLimit, RequestTimer
from services.control.scheduler import Scheduler
from services.control.schemas import (
    Cluster,
    Events,
    Health,
    Metrics,
    Ready,
    Run,
    RunList,
    RunState,
    iso_time,
    run_resource,
)
from services.control.store import FINAL, Store

if TYPE_CHECKING:  # the transport module pulls in torch; the control service only needs the keys' fields
    from services.common.transport import CurveKeys
    from services.control.kubernetes import KubernetesLauncher
    from services.control.launchers import Launcher

RunId = Annotated[str, Path(min_length=1, max_length=64)]


@dataclass
class Settings:
    """What `atomo serve` configures: the store, the PS control endpoint (and its CURVE keys), the API token
    (None: open, loopback only), the body limit and deadline, the read cache's size, how the PS is polled and
    when it counts as lost, and (with the Kubernetes launcher) how long a run waits for its workers and when
    idle workers are released."""

    db_path: str = "atomo-control.db"
    ps_endpoint: str = "tcp://127.0.0.1:5556"
    token: str | None = None
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0
    read_cache_bytes: int = 64 << 20
    poll_interval_s: float = 0.5
    ps_timeout_s: float = 2.0
    lost_after_s: float = 120.0
    curve: CurveKeys | None = None
    worker_wait_s: float = 600.0
    release_after_s: float = 60.0


def _json(content: dict, status_code: int = 200) -> Response:
    """Serialize an answer directly: the store's data was validated on the way in, and the models in
    schemas.py document the shape (tests/test_control_schema.py checks every answer against them)."""
    return Response(json.dumps(content, separators=(",", ":")), status_code, media_type="application/json")


class ReadCache:
    """Serialized answers of the read routes, each valid until the store's next write. The control service
    is its store's only writer, so an answer built at store version v is current while the version is v:
    many clients polling the same run cost one query and one serialization per scheduler poll.

    Answers are keyed on the request's validated parameters (a route name and its values), not its raw
    query string, so that reordered, repeated or unknown query parameters neither miss nor add entries. The
    cache holds at most `max_bytes` of answers, least recently used out first; an answer larger than a
    quarter of that is served but not kept. Called from the threadpool (the store reads and the encoding
    stay off the event loop), so it locks."""

    def __init__(self, store: Store, max_bytes: int = 64 << 20):
        self.store, self.max_bytes = store, max_bytes
        self._answers: OrderedDict[tuple, bytes] = OrderedDict()
        self._version = store.version
        self.bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    def answer(self, key: tuple, build: Callable[[], dict | bytes]) -> Response:
        version = self.store.version
        with self._lock:
            if version != self._version:  # a write made every answer stale
                self._answers.clear()
                self._version, self.bytes = version, 0
            body = self._answers.get(key)
            if body is not None:
                self._answers.move_to_end(key)
                return Response(body, media_type="application/json")
        built = build()
        body = built if isinstance(built, bytes) else json.dumps(built, separators=(",", ":")).encode()
        with self._lock:
            if version == self._version and key not in self._answers and 4 * len(body) <= self.max_bytes:
                self._answers[key] = body
                self.bytes += len(body)
                while self.bytes > self.max_bytes:
                    self.bytes -= len(self._answers.popitem(last=False)[1])
        return Response(body, media_type="application/json")


def _page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def _page_seq(token: str) -> int:
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "seq" and value.isdigit():
            return int(value)
    except (binascii.Error, UnicodeError, ValueError):
        pass
    detail = [{"field": "page_token", "in": "query", "message": "not a page token from a previous listing"}]
    raise ApiError(422, "invalid request: page_token", detail)


# The app ------------------------------------------------------------------------------------------------

_ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 413, 415, 422, 500)}


def create_app(
    settings: Settings, launcher: Launcher | None = None, scaler: KubernetesLauncher | None = None
) -> FastAPI:
    """The app for `settings`; `launcher`, when it supervises the PS process (`atomo up`), tells the
    scheduler, /readyz and GET /v1/cluster when that process is down; `scaler` (the Kubernetes launcher)
    scales the workers for each run and back to idle (see services/control/scheduler.py)."""
    store = Store(settings.db_path)
    registry = CollectorRegistry()
    metrics = create(CONTROL_METRICS, registry)
    ps = PSClient(settings.ps_endpoint, settings.ps_timeout_s, settings.curve)
    scheduler = Scheduler(
        store,
        ps,
        metrics["atomo_control_run_duration_seconds"],
        settings.poll_interval_s,
        settings.lost_after_s,
        launcher,
        scaler,
        settings.worker_wait_s,
        settings.release_after_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(
        title="atomo control service",
        version="1",
        description="Submit and follow ATOMO training runs on a parameter-server cluster.",
        lifespan=lifespan,
        docs_url=None,  # docs.install serves /docs from packaged assets (offline)
        redoc_url=None,
    )
    cache = ReadCache(store, settings.read_cache_bytes)
    app.state.store, app.state.scheduler, app.state.settings = store, scheduler, settings
    app.state.cache, app.state.metrics = cache, metrics
    errors.install(app)
    docs.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(
        RequestTimer,
        histogram=metrics["atomo_control_http_request_duration_seconds"],
        in_flight=metrics["atomo_control_http_requests_in_flight"],
    )

    # Every route that reads or writes the store is a plain `def`, which FastAPI runs in its threadpool: a
    # slow query or a large answer's encoding never holds the event loop, so /healthz and every other
    # request keep being served meanwhile.

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_dependency(settings.token))], responses=_ERRORS)

    def get_run(run_id: str) -> dict:
        run = store.get_run(run_id)
        if run is None:
            raise ApiError(404, f"no run {run_id!r}")
        return run

    @v1.post("/runs", status_code=201, response_model=Run, summary="Submit a run (queued, FIFO)")
    def submit_run(spec: Annotated[RunSpec | None, Body()] = None) -> Response:
        spec = spec or RunSpec()
        run = store.create_run(spec.model_dump(mode="json"))
        scheduler.wake()
        return _json(run_resource(run), 201)

    @v1.get("/runs", response_model=RunList, summary="List runs, newest first")
    def list_runs(
        state: Annotated[list[RunState] | None, Query(description="only runs in these states")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        page_token: Annotated[str | None, Query(max_length=200)] = None,
    ) -> Response:
        states = sorted(set(state)) if state else None
        before = None if page_token is None else _page_seq(page_token)

        def build() -> dict:
            runs = store.list_runs(states, before, limit)
            token = _page_token(runs[-1]["seq"]) if len(runs) == limit else None
            return {"runs": [run_resource(r) for r in runs], "next_page_token": token}

        return cache.answer(("runs", tuple(states or ()), before, limit), build)

    @v1.get("/runs/{run_id}", response_model=Run, summary="A run: state, progress and figures")
    def read_run(run_id: RunId) -> Response:
        return cache.answer(("run", run_id), lambda: run_resource(get_run(run_id)))

    @v1.get("/runs/{run_id}/metrics", response_model=Metrics, summary="Per-step records after step `since`")
    def read_metrics(
        run_id: RunId,
        since: Annotated[int, Query(ge=-1, le=2**62)] = -1,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> Response:
        def build() -> bytes:  # the records as stored (JSON text), joined: none is decoded and encoded again
            get_run(run_id)
            records, last = store.metrics_text(run_id, since, limit)
            head = json.dumps(run_id)
            next_since = since if last is None else last
            return f'{{"run_id":{head},"records":[{",".join(records)}],"next_since":{next_since}}}'.encode()

        return cache.answer(("metrics", run_id, since, limit), build)

    @v1.get("/runs/{run_id}/events", response_model=Events, summary="State changes, worker joins and losses")
    def read_events(
        run_id: RunId,
        since: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> Response:
        def build() -> dict:
            get_run(run_id)
            events = [e | {"time": iso_time(e["time"])} for e in store.events(run_id, since, limit)]
            next_since = max((e["seq"] for e in events), default=since)  # ordered by time, not seq
            return {"run_id": run_id, "events": events, "next_since": next_since}

        return cache.answer(("events", run_id, since, limit), build)

    @v1.post(
        "/runs/{run_id}/cancel",
        response_model=Run,
        summary="Cancel a run (idempotent)",
        responses={409: {"model": ErrorBody, "description": "the run already succeeded or failed"}},
    )
    def cancel_run(run_id: RunId) -> Response:
        run = get_run(run_id)
        if run["state"] in ("succeeded", "failed"):
            raise ApiError(409, f"run {run_id} already {run['state']}", {"state": run["state"]})
        if run["state"] != "cancelled" and not store.transition(
            run_id, "cancelled", "cancelled on request before it started", from_states=("queued",)
        ):
            store.request_cancel(run_id)
            scheduler.wake()
        return _json(run_resource(get_run(run_id)))

    @v1.get(
        "/runs/{run_id}/checkpoint",
        summary="The run's latest model weights (torch.save of the state_dict)",
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "the checkpoint file"},
            503: {"model": ErrorBody, "description": "the PS is unreachable"},
        },
    )
    def read_checkpoint(run_id: RunId) -> Response:
        get_run(run_id)
        try:
            step, data = ps.checkpoint(run_id)
        except PSUnavailable as exc:
            raise ApiError(503, f"the PS is unreachable: {exc}") from exc
        except PSError as exc:
            raise ApiError(404, f"no checkpoint for run {run_id}: {exc}") from exc
        headers = {"Content-Disposition": f'attachment; filename="{run_id}-step{step}.pt"', "X-Atomo-Step": str(step)}
        return Response(data, media_type="application/octet-stream", headers=headers)

    @v1.get("/cluster", response_model=Cluster, summary="The PS and every worker, as last seen")
    def read_cluster() -> Cluster:  # the launcher's ps_process() may wait on its lock
        status = scheduler.cluster or {}
        live = status.get("run") or {}
        ps_info = dict(status.get("ps") or {})
        process = launcher.ps_process() if launcher is not None else None
        if process is not None:
            ps_info["process"] = process
            if process["state"] == "down":
                ps_info["state"] = "down"
        return Cluster(
            reachable=scheduler.ps_reachable(),
            endpoint=settings.ps_endpoint,
            observed_at=iso_time(scheduler.last_contact),
            ps=ps_info or None,
            workers=status.get("workers") or [],
            run_id=live.get("run_id") if live.get("state") not in FINAL else None,
            pods=scheduler.pods,
            pods_error=scheduler.pods_error,
        )

    app.include_router(v1)
    app.include_router(artifacts.router(store, settings.token))

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Ready,
        summary="Readiness: the store is open and the PS reachable",
        responses={503: {"model": Ready, "description": "not ready"}},
    )
    def readyz(response: Response) -> Ready:
        down = scheduler.ps_down()
        ready = Ready(ready=False, store=store.ping(), ps=scheduler.ps_reachable())
        ready.ready = ready.store and ready.ps
        if not ready.store:
            ready.reason = f"the store {settings.db_path} cannot be read"
        elif not ready.ps:
            ready.reason = down or f"the PS at {settings.ps_endpoint} does not answer"
        response.status_code = 200 if ready.ready else 503
        return ready

    counted = {"version": None}  # the store version atomo_control_runs was counted at

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        version = store.version
        if counted["version"] != version:  # the runs are counted again only after a write: a scrape is cheap
            runs = metrics["atomo_control_runs"]
            for state, n in store.count_by_state().items():
                runs.labels(state=state).set(n)
            counted["version"] = version
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
