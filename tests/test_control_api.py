"""The control service's REST API over real HTTP (`atomo serve` in a child process) with no PS reachable:
validation, authentication, the error shape, pagination, cancel of queued runs, store durability."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys

import httpx
import pytest

from services.cli import main
from services.control.app import Settings, create_app
from services.control.auth import load_token
from services.control.client import ApiError, Client
from services.control.commands.common import compact_count, compact_float
from services.control.launchers import ControlProcess, free_port
from services.control.store import Store

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory, dead_ps):
    where = tmp_path_factory.mktemp("control")
    extra = ("--poll-interval", "0.2", "--log-level", "info", "--access-log")  # every request logged
    control = ControlProcess(where / "control.db", dead_ps, TOKEN, extra_args=extra, log_path=where / "c.log")
    yield control.start()
    control.stop()


@pytest.fixture
def api(service):
    with Client(service.url, TOKEN) as client:
        yield client


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    return body["error"]


INVALID_SPECS = [
    ({"model": "alexnet"}, "model"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"codec": {"name": "zip"}}, "codec.name"),
    ({"codec": {"name": "svd", "budget": 0}}, "codec.budget"),
    ({"codec": {"name": "svd", "budget": -2.5}}, "codec.budget"),
    ({"codec": {"name": "qsgd", "bits": 0}}, "codec.bits"),
    ({"codec": {"name": "qsgd", "bits": 17}}, "codec.bits"),
    ({"codec": {"name": "svd", "bits": 4}}, "codec.bits"),
    ({"codec": {"name": "qsgd", "budget": 3}}, "codec.budget"),
    ({"codec": {"name": "svd", "reshape": "columns"}}, "codec.reshape"),
    ({"workers": 0}, "workers"),
    ({"workers": 257}, "workers"),
    ({"workers": 2, "num_aggregate": 3}, "num_aggregate"),
    ({"workers": 2, "min_workers": 3}, "min_workers"),
    ({"workers": 8, "batch_size": 4}, "batch_size"),
    ({"steps": 0}, "steps"),
    ({"steps": 10, "epochs": 1}, "epochs"),
    ({"lr": 0}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"name": ""}, "name"),
    ({"step_milestones": [10, "x"]}, "step_milestones[1]"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"codec": {"name": "svd", "extra": 1}}, "codec.extra"),
    ({"device": "tpu"}, "device"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID_SPECS, ids=[f for _, f in INVALID_SPECS])
def test_invalid_spec_is_422_naming_the_field(service, spec, field):
    response = httpx.post(service.url + "/v1/runs", json=spec, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_error"
    assert field in [d["field"] for d in error["details"]], error
    assert field in error["message"]


def test_malformed_json_is_422_on_the_body(service):
    response = httpx.post(
        service.url + "/v1/runs",
        content=b'{"model": ',
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert [d["field"] for d in error_of(response)["details"]] == ["body"]


def test_empty_spec_queues_the_default_run(api):
    run = api.submit({})
    assert run["state"] == "queued" and run["id"].startswith("run-")
    assert run["spec"]["model"] == "lenet5" and run["spec"]["codec"]["name"] == "svd"
    assert run["created_at"] and run["started_at"] is None
    fetched = api.run(run["id"])
    assert fetched["state"] == "queued"  # no PS: it waits
    assert fetched["spec"] == run["spec"]


def test_readyz_is_false_without_ps_and_healthz_is_open(service):
    health = httpx.get(service.url + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(service.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json() == {
        "ready": False,
        "store": True,
        "ps": False,
        "reason": f"the PS at {service.ps_endpoint} does not answer",
    }


def test_cluster_reports_unreachable_ps(api, dead_ps):
    cluster = api.cluster()
    assert cluster["reachable"] is False and cluster["endpoint"] == dead_ps and cluster["workers"] == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
    ids=["missing", "wrong", "basic-scheme", "no-scheme"],
)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/runs"), ("POST", "/v1/runs"), ("GET", "/v1/cluster"), ("GET", "/v1/runs/x")]
)
def test_v1_requires_the_token(service, headers, method, path):
    response = httpx.request(method, service.url + path, headers=headers, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert error_of(response)["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/runs/run-doesnotexist", 404, "not_found"),
        ("GET", "/v1/runs/run-doesnotexist/metrics", 404, "not_found"),
        ("GET", "/v1/runs/run-doesnotexist/events", 404, "not_found"),
        ("GET", "/v1/runs/run-doesnotexist/checkpoint", 404, "not_found"),
        ("POST", "/v1/runs/run-doesnotexist/cancel", 404, "not_found"),
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("DELETE", "/v1/runs", 405, "method_not_allowed"),
        ("PUT", "/v1/runs/x/cancel", 405, "method_not_allowed"),
        ("GET", "/v1/runs?limit=0", 422, "validation_error"),
        ("GET", "/v1/runs?state=paused", 422, "validation_error"),
        ("GET", "/v1/runs?page_token=not-a-token", 422, "validation_error"),
    ],
)
def test_error_shape(service, method, path, status, code):
    response = httpx.request(method, service.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == status
    assert error_of(response)["code"] == code


def test_body_limit_is_413(service):
    big = {"name": "x", "step_milestones": list(range(300_000))}  # about 2 MB of JSON, over the 1 MiB limit
    response = httpx.post(service.url + "/v1/runs", json=big, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"


def test_pagination_walks_every_run_once_newest_first(api):
    created = [api.submit({"name": f"page-{i}", "steps": 5, "model": "mlp"})["id"] for i in range(7)]
    seen, token = [], None
    while True:
        page = api.runs(limit=3, page_token=token)
        assert len(page["runs"]) <= 3
        seen += [r["id"] for r in page["runs"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == len(set(seen))
    positions = [seen.index(i) for i in created]
    assert positions == sorted(positions, reverse=True)  # newest first


def test_cancel_queued_run_is_immediate_and_idempotent(api):
    run = api.submit({"name": "to-cancel"})
    assert api.run(run["id"])["state"] == "queued"  # read, and cached until the next write
    first = api.cancel(run["id"])
    assert api.run(run["id"])["state"] == "cancelled"
    second = api.cancel(run["id"])
    assert first["state"] == second["state"] == "cancelled"
    assert first["finished_at"] == second["finished_at"]
    states = [e["detail"]["state"] for e in api.events(run["id"])["events"] if e["type"] == "state"]
    assert states == ["queued", "cancelled"]
    assert run["id"] in [r["id"] for r in api.runs(state=["cancelled"], limit=500)["runs"]]
    assert run["id"] not in [r["id"] for r in api.runs(state=["queued"], limit=500)["runs"]]


def test_metrics_endpoint_counts_runs_by_state(api, service):
    queued = len(api.runs(state=["queued"], limit=500)["runs"])
    text = httpx.get(service.url + "/metrics").text
    assert f'atomo_control_runs{{state="queued"}} {float(queued)}' in text
    assert 'atomo_control_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/runs",' in text
    assert "atomo_control_run_duration_seconds_count" in text


def test_openapi_and_docs_are_served(service):
    spec = httpx.get(service.url + "/openapi.json").json()
    assert {"/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/cancel", "/v1/cluster"} <= set(spec["paths"])
    assert httpx.get(service.url + "/docs").status_code == 200


def test_store_survives_a_restart(tmp_path, dead_ps):
    control = ControlProcess(tmp_path / "control.db", dead_ps, TOKEN).start()
    try:
        with Client(control.url, TOKEN) as api:
            ids = [api.submit({"name": f"durable-{i}"})["id"] for i in range(3)]
            api.cancel(ids[1])
            before = {i: api.run(i) for i in ids}
    finally:
        control.stop(kill=True)  # a crash, not a graceful stop
    control = ControlProcess(tmp_path / "control.db", dead_ps, TOKEN).start()
    try:
        with Client(control.url, TOKEN) as api:
            assert {i: api.run(i) for i in ids} == before
            assert [r["id"] for r in api.runs(state=["queued"])["runs"]] == [ids[2], ids[0]]
    finally:
        control.stop()


def atomo(capsys, *args) -> tuple[int, str, str]:
    """Run an `atomo` command in this process (the real CLI over real HTTP); (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_open_service_refuses_a_public_bind(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ATOMO_API_TOKEN", raising=False)
    code, _, err = atomo(capsys, "serve", "--host", "0.0.0.0", "--db", str(tmp_path / "c.db"))
    assert code == 2
    assert "refusing to bind 0.0.0.0 without an API token" in err


def test_cli_submit_runs_cancel_logs(service, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATOMO_URL", service.url)
    monkeypatch.setenv("ATOMO_API_TOKEN", TOKEN)
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: mlp\ndataset: digits\ncodec:\n  name: qsgd\n  bits: 2\nsteps: 20\n")
    code, out, err = atomo(capsys, "submit", str(spec), "--workers", "3", "--set", "codec.bucket_size=128")
    assert code == 0, err
    run_id = out.strip()
    with Client(service.url, TOKEN) as api:
        spec_seen = api.run(run_id)["spec"]
    assert spec_seen["workers"] == 3 and spec_seen["codec"] == spec_seen["codec"] | {"bits": 2, "bucket_size": 128}
    code, out, _ = atomo(capsys, "runs", "--state", "queued")
    assert code == 0 and run_id in out
    code, out, _ = atomo(capsys, "cancel", run_id)
    assert code == 0 and "cancelled" in out
    code, out, _ = atomo(capsys, "logs", run_id)
    assert code == 0 and '"state": "cancelled"' in out
    code, out, _ = atomo(capsys, "status", run_id)
    assert code == 1 and "cancelled" in out

    code, _, err = atomo(capsys, "submit", "--set", "codec.budget=-1")
    assert code == 1 and "codec.budget" in err
    code, _, err = atomo(capsys, "status", "run-doesnotexist")
    assert code == 1 and "no run" in err
    code, _, err = atomo(capsys, "runs", "--token", "nope")
    assert code == 1 and "401" in err
    code, _, err = atomo(capsys, "runs", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach the control service" in err


def test_api_error_carries_the_fields(api):
    with pytest.raises(ApiError) as info:
        api.submit({"codec": {"name": "qsgd", "bits": 99}})
    assert info.value.status == 422 and info.value.details[0]["field"] == "codec.bits"


def test_token_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("ATOMO_API_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_token(None) is None
    assert load_token(str(token_file)) == "from-file"
    monkeypatch.setenv("ATOMO_API_TOKEN", "from-env")
    assert load_token(str(token_file)) == "from-env"
    monkeypatch.delenv("ATOMO_API_TOKEN")
    token_file.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_token(str(token_file))


def test_the_token_is_never_logged(service):
    httpx.get(service.url + "/v1/runs", headers={"Authorization": f"Bearer {TOKEN}"})
    httpx.get(service.url + "/v1/runs", headers={"Authorization": "Bearer wrong-token-xyz"})
    log = service.log_path.read_text()
    assert '"GET /v1/runs HTTP/1.1" 200' in log and '"GET /v1/runs HTTP/1.1" 401' in log  # requests are logged
    assert TOKEN not in log and "wrong-token-xyz" not in log


def test_internal_errors_have_the_error_shape(tmp_path, dead_ps):
    """A store broken under the running app (its runs table dropped) gives 500 in the one error shape."""
    app = create_app(Settings(db_path=str(tmp_path / "c.db"), ps_endpoint=dead_ps, token=TOKEN))
    with sqlite3.connect(tmp_path / "c.db") as conn:
        conn.execute("DROP TABLE runs")

    async def get_runs() -> httpx.Response:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
            return await client.get("/v1/runs", headers={"Authorization": f"Bearer {TOKEN}"})

    response = asyncio.run(get_runs())
    assert response.status_code == 500
    assert error_of(response) == {"code": "internal_error", "message": "internal error", "details": None}


def test_docs_work_offline_from_packaged_assets(service):
    page = httpx.get(service.url + "/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if "//" in a or not a.startswith("/")], assets  # no other host
    for path in assets:
        asset = httpx.get(service.url + path)
        assert asset.status_code == 200 and len(asset.content) > 1000, path
    assert httpx.get(service.url + "/docs/assets/index.html").status_code == 404  # only the page's own files
    assert httpx.get(service.url + "/redoc").status_code == 404  # FastAPI's CDN-based page is off


def test_a_form_encoded_submission_is_415_with_a_hint_to_send_json(api, service):
    before = len(api.runs(limit=500)["runs"])
    response = httpx.post(
        service.url + "/v1/runs", data={"model": "mlp"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )  # what `curl -d` sends
    assert response.status_code == 415
    assert "Content-Type: application/json" in error_of(response)["message"]
    assert len(api.runs(limit=500)["runs"]) == before  # nothing queued


def test_the_connection_error_names_the_url_it_tried(monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("ATOMO_URL", url)
    code, _, err = atomo(capsys, "runs")
    assert code == 2 and f"cannot reach the control service at {url}:" in err and "$ATOMO_URL" not in err


def test_runs_table_keeps_its_columns_with_huge_numbers(tmp_path, dead_ps, capsys):
    store = Store(tmp_path / "control.db")  # figures the PS could report, written where the service reads them
    huge = store.create_run({"name": "two\nlines"})["id"]
    store.set_progress(huge, {"step": 9_999_999, "total_steps": 10_000_000, "loss": 1e30, "test_accuracy": 0.5})
    store.set_progress(store.create_run({"name": "small"})["id"], {"step": 3, "total_steps": 300, "loss": 2.5})
    store.close()
    control = ControlProcess(tmp_path / "control.db", dead_ps, TOKEN).start()
    try:
        code, out, _ = atomo(capsys, "runs", "--url", control.url, "--token", TOKEN)
    finally:
        control.stop()
    header, *rows = out.splitlines()
    assert code == 0 and len(rows) == 2, out
    assert "3/300" in rows[0] and "2.5000" in rows[0]
    assert "10M/10M" in rows[1] and "1.00e+30" in rows[1] and "0.500" in rows[1] and "two?lines" in rows[1]
    for column in ("ACC", "LOSS", "STEP"):  # right-aligned: every value ends where its heading ends
        end = header.index(column) + len(column)
        assert all(row[end - 1] != " " and row[end] == " " for row in rows), out
    created = header.index("CREATED")  # and every row's date starts under its heading
    assert all(re.match(r"\d{4}-\d\d-\d\d ", row[created:]) for row in rows), out
    figures = [compact_float(x) for x in (0.0055, 1e30, -3.5e-7, float("nan"))]
    assert figures == ["0.0055", "1.00e+30", "-3.50e-07", "nan"]
    assert [compact_count(n) for n in (99_999, 1_234_567, 2**63 - 1)] == ["99999", "1.23M", "9.22E"]


def test_a_closed_pipe_ends_a_command_quietly(service):
    """`atomo runs | head`: the reader goes away before the table is written."""
    command = [sys.executable, "-m", "services", "runs", "--url", service.url, "--token", TOKEN, "--limit", "500"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141 and b"Traceback" not in err, err.decode()
