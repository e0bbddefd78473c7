"""The API's resources: response models (the OpenAPI schema) and the mapping from store rows to JSON."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel

from services.common.spec import RunSpec
from services.control.store import PROGRESS_FIELDS, STATES

RunState = Literal[STATES]


class Run(BaseModel):
    id: str
    name: str
    state: RunState
    reason: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    cancel_requested: bool = False
    spec: RunSpec
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    test_accuracy: float | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    compression_ratio: float | None = None
    mean_encode_s: float | None = None
    mean_compute_s: float | None = None
    mean_communication_s: float | None = None
    workers_training: int | None = None  # workers holding a shard now (0 once the run ends)
    workers_at_start: int | None = None  # workers when training started; fewer than spec.workers: said so


class RunList(BaseModel):
    runs: list[Run]
    next_page_token: str | None = None


class Metrics(BaseModel):
    run_id: str
    records: list[dict[str, Any]]
    next_since: int


class Event(BaseModel):
    seq: int
    time: datetime
    type: str
    detail: Any = None


class Events(BaseModel):
    run_id: str
    events: list[Event]
    next_since: int


class PSProcess(BaseModel):
    """The PS process as its supervising launcher sees it (`atomo up`); absent under plain `atomo serve`."""

    state: Literal["up", "down"]
    pid: int | None = None
    restarts: int = 0
    exit_status: int | None = None
    cause: str | None = None  # "exited with status N", or why the supervisor killed it (hung)
    since: float | None = None
    log_tail: str | None = None


class PSInfo(BaseModel):
    address: str | None = None
    device: str | None = None
    state: str | None = None
    port: int | None = None
    control_port: int | None = None
    metrics_port: int | None = None
    process: PSProcess | None = None


class Worker(BaseModel):
    id: str
    address: str | None = None
    device: str | None = None
    state: str | None = None
    last_heartbeat: float | None = None
    run: str | None = None
    metrics_port: int | None = None
    pid: int | None = None


class Pod(BaseModel):
    """A worker pod as the Kubernetes launcher last listed it (`atomo serve --launcher kubernetes`)."""

    name: str
    statefulset: str
    phase: str | None = None
    ready: bool = False
    node: str | None = None
    reason: str | None = None  # why it is not ready, as the API reports it; None when ready


class Cluster(BaseModel):
    reachable: bool
    endpoint: str
    observed_at: datetime | None = None
    ps: PSInfo | None = None
    workers: list[Worker] = []
    run_id: str | None = None
    pods: list[Pod] = []  # worker pods, with the Kubernetes launcher only
    pods_error: str | None = None  # why the pods could not be listed


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    store: bool
    ps: bool
    reason: str | None = None


def iso_time(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


def run_resource(run: dict) -> dict:
    """A store row as the `Run` resource's JSON."""
    return {
        "id": run["id"],
        "name": run["spec"].get("name", ""),
        "state": run["state"],
        "reason": run["reason"],
        "created_at": iso_time(run["created_at"]),
        "started_at": iso_time(run["started_at"]),
        "finished_at": iso_time(run["finished_at"]),
        "error": run["error"],
        "cancel_requested": run["cancel_requested"],
        "spec": run["spec"],
        **{k: run["progress"].get(k) for k in PROGRESS_FIELDS},
    }
