"""A run's results over REST: the report, the per-step CSV and the plots that `atomo train` writes into its
results folder (services/report.py), built from the per-step records in the control service's store.

They work for a run that is still going (built from the records copied so far, and saying up to which step)
as well as a finished one. The cost is bounded: the records are read from the store a page at a time, the
plots' curves keep at most `report.MAX_POINTS` points per run, the summary and the plots are built once per
(run, last stored step, target) and cached (a few runs' worth), and one request at a time renders.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from services import report
from services.control.auth import bearer_dependency
from services.control.errors import ApiError, ErrorBody
from services.control.schemas import RunState
from services.control.store import Store

RunId = Annotated[str, Path(min_length=1, max_length=64)]
PAGE = 2000  # records read from the store per query
CACHED_BUILDS = 16  # (run, step, target) builds kept: summaries, curves and rendered plots


class RunReport(BaseModel):
    """The figures of `services.report.summarize`, as in `atomo train`'s report.json. Bytes "up" go from the
    workers to the PS, "down" from the PS to the workers, "total" both ways."""

    label: str = Field(description="the run's codec")
    steps: int
    time_s: float = Field(description="seconds from the end of step 1 to the last step")
    final_loss: float | None = None
    final_test_accuracy: float | None = None
    best_test_accuracy: float | None = None
    target_accuracy: float | None = None
    time_to_target_s: float | None = None
    step_to_target: int | None = None
    bytes_up_to_target: int | None = None
    bytes_down_to_target: int | None = None
    bytes_total_to_target: int | None = None
    bytes_up: int
    bytes_down: int
    bytes_total: int
    dense_bytes_up: int = Field(description="what dense fp32 gradients would have sent up")
    compression_ratio: float | None = Field(None, description="dense_bytes_up / bytes_up")
    mean_compute_s: float | None = None
    mean_encode_s: float | None = None
    mean_communication_s: float | None = None


class ReportAnswer(BaseModel):
    run_id: str
    state: RunState
    step: int = Field(description="the last step the report covers (0: no step stored yet)")
    report: RunReport
    plots: list[str] = Field(description="names for /v1/runs/{id}/plots/{name}; none before the first step")


class StoredRecords:
    """A run's per-step records in step order up to `until_step`, read from the store a page at a time.
    Iterating again reads them again, so the report's two passes hold no more than a page in memory."""

    def __init__(self, store: Store, run_id: str, until_step: int, page: int = PAGE):
        self.store, self.run_id, self.until_step, self.page = store, run_id, until_step, page

    def __iter__(self) -> Iterator[dict]:
        since = -1
        while since < self.until_step:
            records = self.store.metrics(self.run_id, since, self.page)
            for r in records:
                if r["step"] > self.until_step:
                    return
                yield r
            if len(records) < self.page:
                return
            since = records[-1]["step"]


class _Build:
    """What one (run, last step, target) gives: the summary now, the curves and each plot when first asked."""

    def __init__(self, label: str, records: StoredRecords, target: float | None):
        self.label, self.records = label, records
        self.summary = report.summarize_runs({label: records}, target)[label]
        self._curves: report.Curves | None = None
        self.plots: dict[str, bytes] = {}

    def plot(self, name: str) -> bytes:
        if name not in self.plots:
            if self._curves is None:
                self._curves = report.curves(self.records)
            self.plots[name] = report.render({self.label: self._curves}, name)
        return self.plots[name]


class Artifacts:
    """Builds and caches runs' reports and plots from a store."""

    def __init__(self, store: Store, max_builds: int = CACHED_BUILDS):
        self.store, self.max_builds = store, max_builds
        self._builds: OrderedDict[tuple, _Build] = OrderedDict()
        self._lock = threading.Lock()  # one build or rendering at a time: a bounded cost whoever asks

    def run(self, run_id: str) -> dict:
        run = self.store.get_run(run_id)
        if run is None:
            raise ApiError(404, f"no run {run_id!r}")
        return run

    def build(self, run: dict, target: float | None = None) -> tuple[int, _Build]:
        """The last stored step of the run and its build, from the cache while no later step is stored."""
        step = max(0, self.store.last_step(run["id"]))
        key = (run["id"], step, target)
        with self._lock:
            built = self._builds.get(key)
            if built is None:
                label = str(run["spec"].get("codec", {}).get("name", "run"))
                built = _Build(label, StoredRecords(self.store, run["id"], step), target)
                self._builds[key] = built
                while len(self._builds) > self.max_builds:
                    self._builds.popitem(last=False)
            self._builds.move_to_end(key)
            return step, built

    def plot(self, run: dict, name: str) -> tuple[int, bytes]:
        if name not in report.PLOT_FILES:
            raise ApiError(404, f"no plot {name!r}; plots: {', '.join(report.PLOT_FILES)}")
        step, built = self.build(run)
        if step == 0:
            raise ApiError(404, f"run {run['id']} has no per-step records yet: no plot before its first step")
        with self._lock:
            return step, built.plot(name)


_ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 422, 500)}


def router(store: Store, token: str | None) -> APIRouter:
    """The /v1 routes of a run's report, CSV and plots, behind the same bearer token as the rest of /v1."""
    artifacts = Artifacts(store)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_dependency(token))], responses=_ERRORS)

    @v1.get(
        "/runs/{run_id}/report",
        response_model=ReportAnswer,
        summary="The run's summary figures (atomo train's report.json) and its plots' names",
    )
    def read_report(
        run_id: RunId,
        target_accuracy: Annotated[
            float | None, Query(gt=0, le=1, description="for the 'to target' figures; default 0.9 x final")
        ] = None,
    ) -> ReportAnswer:
        run = artifacts.run(run_id)
        step, built = artifacts.build(run, target_accuracy)
        plots = list(report.PLOT_FILES) if step else []
        return ReportAnswer(run_id=run_id, state=run["state"], step=step, report=built.summary, plots=plots)

    @v1.get(
        "/runs/{run_id}/metrics.csv",
        summary="The run's per-step records as CSV (atomo train's metrics.csv)",
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}, "description": "one row per step, a header row first"}},
    )
    def read_metrics_csv(run_id: RunId) -> StreamingResponse:
        artifacts.run(run_id)
        step = max(0, store.last_step(run_id))
        headers = {"Content-Disposition": f'attachment; filename="{run_id}-metrics.csv"', "X-Atomo-Step": str(step)}
        chunks = report.csv_chunks(StoredRecords(store, run_id, step))
        return StreamingResponse(chunks, media_type="text/csv", headers=headers)

    @v1.get(
        "/runs/{run_id}/plots/{name}",
        summary="One of the run's plots (PNG), by name as listed in its report",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the plot"}},
    )
    def read_plot(run_id: RunId, name: Annotated[str, Path(min_length=1, max_length=100)]) -> Response:
        step, png = artifacts.plot(artifacts.run(run_id), name)
        return Response(png, media_type="image/png", headers={"X-Atomo-Step": str(step)})

    return v1
