"""A REST run's report, CSV and plots over real HTTP: `atomo serve` in front of a real local PS and two workers,
tiny MLP runs on digits. What is served must be what services.report makes of the run's per-step records,
while the run goes on (up to the last stored step) and once it has ended."""

from __future__ import annotations

import csv
import io
import time

import httpx
import pytest
from PIL import Image
from test_report import unresolved

from services import report
from services.control.client import Client
from services.control.launchers import ControlProcess, LocalLauncher

pytestmark = pytest.mark.slow

TOKEN = "artifacts-token"
TINY = {"model": "mlp", "dataset": "digits", "workers": 2, "batch_size": 32, "eval_every": 5}
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    with LocalLauncher(tmp_path_factory.mktemp("cluster"), workers=2, threads=1, metrics=False) as cluster:
        db = tmp_path_factory.mktemp("control") / "control.db"
        process = ControlProcess(db, cluster.control_endpoint, TOKEN, extra_args=("--poll-interval", "0.2")).start()
        yield process
        process.stop()


@pytest.fixture(scope="module")
def api(control):
    with Client(control.url, TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def http(control):
    with httpx.Client(base_url=control.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        yield client


def wait_for(api: Client, run_id: str, until, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api.run(run_id)
        if until(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not reach the condition within {timeout_s} s: {run}")


def all_records(api: Client, run_id: str) -> list[dict]:
    return api.metrics(run_id, limit=10_000)["records"]


def check_csv(text: str, records: list[dict]) -> None:
    """The CSV has one row per record, every field the record's value (empty where it has none)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert set(record) <= set(row)
        for key, cell in row.items():
            value = record.get(key)
            if value is None:
                assert cell == ""
            elif isinstance(value, (int, float)):
                assert float(cell) == pytest.approx(value, rel=1e-12)
            else:
                assert cell == str(value)


def check_png(response: httpx.Response, step: int) -> None:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-atomo-step"] == str(step)
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG" and 400 <= image.width <= 1500 and 300 <= image.height <= 1000
    colours = image.convert("L").getextrema()
    assert colours[1] - colours[0] > 100  # drawn, not a blank canvas


def test_a_finished_run_serves_the_report_csv_and_plots_of_its_records(api, http):
    run = api.submit(TINY | {"name": "artifacts", "steps": 30})
    assert unresolved(run["spec"]) == []  # the run records the spec that runs, every default filled in
    run = wait_for(api, run["id"], lambda r: r["state"] in FINAL)
    assert run["state"] == "succeeded" and unresolved(run["spec"]) == []
    records = all_records(api, run["id"])
    assert [r["step"] for r in records] == list(range(1, 31))

    answer = http.get(f"/v1/runs/{run['id']}/report").json()
    assert (answer["run_id"], answer["state"], answer["step"]) == (run["id"], "succeeded", 30)
    expected = report.summarize_runs({"svd": records})["svd"]  # labelled by its codec, as `atomo train` does
    assert answer["report"] == pytest.approx(expected)
    assert answer["report"]["bytes_up"] == run["bytes_up"] and answer["report"]["bytes_down"] == run["bytes_down"]
    assert answer["plots"] == list(report.PLOT_FILES)
    at_target = http.get(f"/v1/runs/{run['id']}/report", params={"target_accuracy": 0.5}).json()["report"]
    assert at_target == pytest.approx(report.summarize_runs({"svd": records}, 0.5)["svd"])

    response = http.get(f"/v1/runs/{run['id']}/metrics.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["x-atomo-step"] == "30"
    check_csv(response.text, records)

    for name in answer["plots"]:
        check_png(http.get(f"/v1/runs/{run['id']}/plots/{name}"), 30)


def test_a_running_run_serves_what_it_has_and_a_queued_one_nothing(api, http):
    long_run = api.submit(TINY | {"name": "long", "steps": 100_000})["id"]
    queued = api.submit(TINY | {"name": "after", "steps": 5})["id"]
    try:
        wait_for(api, long_run, lambda r: r["state"] == "running" and (r["step"] or 0) >= 10)
        answer = http.get(f"/v1/runs/{long_run}/report").json()
        step = answer["step"]
        assert answer["state"] == "running" and 10 <= step < 100_000 and answer["report"]["steps"] == step
        assert answer["plots"] == list(report.PLOT_FILES)
        check_png(http.get(f"/v1/runs/{long_run}/plots/training_loss.png"), step)
        response = http.get(f"/v1/runs/{long_run}/metrics.csv")
        served = int(response.headers["x-atomo-step"])
        check_csv(response.text, all_records(api, long_run)[:served])

        empty = http.get(f"/v1/runs/{queued}/report").json()
        assert (empty["state"], empty["step"], empty["plots"], empty["report"]["steps"]) == ("queued", 0, [], 0)
        assert http.get(f"/v1/runs/{queued}/metrics.csv").text == ",".join(report.CSV_COLUMNS) + "\r\n"  # header
        missing = http.get(f"/v1/runs/{queued}/plots/training_loss.png")
        assert missing.status_code == 404 and "no per-step records yet" in missing.json()["error"]["message"]
    finally:
        api.cancel(long_run)
    wait_for(api, long_run, lambda r: r["state"] == "cancelled", timeout_s=60)


def test_unknown_runs_and_plots_are_404_and_the_token_is_required(api, http, control):
    assert api.runs(limit=1)["runs"], "an earlier test made a run"
    run_id = api.runs(limit=1)["runs"][0]["id"]
    for path in ("/v1/runs/run-nope/report", "/v1/runs/run-nope/metrics.csv", "/v1/runs/run-nope/plots/x.png"):
        response = http.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = http.get(f"/v1/runs/{run_id}/plots/secret.png")
    assert response.status_code == 404 and "training_loss.png" in response.json()["error"]["message"]
    bad_target = http.get(f"/v1/runs/{run_id}/report", params={"target_accuracy": 1.5})
    assert bad_target.status_code == 422
    for path in (f"/v1/runs/{run_id}/report", f"/v1/runs/{run_id}/metrics.csv"):
        assert httpx.get(control.url + path).status_code == 401
