"""The control service end to end: `atomo serve` over HTTP, a real local PS and two workers, tiny MLP runs on
digits. FIFO order, metrics and checkpoints, cancelling a running run, and a control service killed and
restarted mid-run (the PS keeps the run; nothing in the store is lost)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from itertools import pairwise

import pytest
import torch

from services.cli import main
from services.common.keys import write_keys
from services.common.launch import LocalCluster
from services.control.client import ApiError, Client
from services.control.launchers import ControlProcess, LocalLauncher, free_port

pytestmark = pytest.mark.slow

TOKEN = "e2e-token"
FINAL = ("succeeded", "failed", "cancelled")
TINY = {"model": "mlp", "dataset": "digits", "workers": 2, "batch_size": 32, "eval_every": 10, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalLauncher(tmp_path_factory.mktemp("cluster"), workers=2, threads=1, metrics=False) as launcher:
        yield launcher


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    return tmp_path_factory.mktemp("control") / "control.db"


def start_control(db_path, cluster) -> ControlProcess:
    return ControlProcess(db_path, cluster.control_endpoint, TOKEN, extra_args=("--poll-interval", "0.2")).start()


@pytest.fixture(scope="module")
def control(db_path, cluster):
    process = start_control(db_path, cluster)
    yield process
    process.stop()


def wait_for(api: Client, run_id: str, until, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api.run(run_id)
        if until(run):
            return run
        assert run["state"] not in FINAL, run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not reach the condition within {timeout_s} s: {run}")


def state_changes(api: Client, run_id: str) -> list[str]:
    return [e["detail"]["state"] for e in api.events(run_id)["events"] if e["type"] == "state"]


def test_three_runs_queue_run_in_order_and_succeed(control, monkeypatch, capsys):
    with Client(control.url, TOKEN) as api:
        ids = [api.submit(TINY | {"name": f"fifo-{i}", "steps": 30, "seed": i})["id"] for i in range(3)]
        assert [api.run(i)["state"] for i in ids[1:]] == ["queued", "queued"]  # one run at a time
        monkeypatch.setenv("ATOMO_URL", control.url)
        monkeypatch.setenv("ATOMO_API_TOKEN", TOKEN)
        for run_id in ids:  # `atomo status` follows each run live until it ends; 0 means it succeeded
            assert main(["status", run_id, "--interval", "0.2"]) == 0
        assert "succeeded: the PS finished every step" in capsys.readouterr().out
        runs = [api.run(i) for i in ids]

        for earlier, later in pairwise(runs):
            assert earlier["finished_at"] <= later["started_at"]  # FIFO, never two at once
        for run in runs:
            assert run["state"] == "succeeded" and run["step"] == run["total_steps"] == 30
            assert state_changes(api, run["id"]) == ["queued", "starting", "running", "succeeded"]
            assert run["bytes_up"] > 0 and run["bytes_down"] > 0 and run["compression_ratio"] > 1
            assert run["mean_compute_s"] > 0 and run["mean_encode_s"] > 0 and run["mean_communication_s"] >= 0
            assert 0.5 < run["test_accuracy"] <= 1.0  # ten classes: chance is 0.1

        first = ids[0]
        records = api.metrics(first)["records"]
        assert [r["step"] for r in records] == list(range(1, 31))
        assert sum(r["bytes_up"] for r in records) == runs[0]["bytes_up"]
        assert [r["step"] for r in api.metrics(first, since=25)["records"]] == [26, 27, 28, 29, 30]
        joined = {e["detail"]["worker"] for e in api.events(first)["events"] if e["type"] == "worker_joined"}
        assert joined == {"worker-0", "worker-1"}

        weights = torch.load(io.BytesIO(api.checkpoint(first)), map_location="cpu", weights_only=False)
        assert isinstance(weights, dict) and weights
        cluster = api.cluster()
        assert cluster["reachable"] and cluster["ps"]["state"] == "idle"
        assert sorted(w["id"] for w in cluster["workers"]) == ["worker-0", "worker-1"]


def test_restart_mid_run_loses_nothing_and_cancel_stops_a_running_run(db_path, cluster, control):
    with Client(control.url, TOKEN) as api:
        long_run = api.submit(TINY | {"name": "long", "steps": 100_000})["id"]
        queued = api.submit(TINY | {"name": "after-long", "steps": 20})["id"]
        wait_for(api, long_run, lambda r: r["state"] == "running" and (r["step"] or 0) >= 5)
        before = api.run(long_run)
    control.stop(kill=True)  # the control service crashes; the PS keeps training
    time.sleep(1.0)
    control.start()  # same store, same port
    with Client(control.url, TOKEN) as api:
        assert api.run(queued)["state"] == "queued"
        resumed = wait_for(api, long_run, lambda r: (r["step"] or 0) >= before["step"] + 20)
        assert resumed["state"] == "running" and resumed["started_at"] == before["started_at"]
        assert "attached" in [e["type"] for e in api.events(long_run)["events"]]
        steps = [r["step"] for r in api.metrics(long_run, limit=10_000)["records"]]
        assert steps == list(range(1, len(steps) + 1))  # copied across the restart without a gap

        requested = api.cancel(long_run)
        assert requested["cancel_requested"] and requested["state"] in ("running", "cancelled")
        cancelled = wait_for(api, long_run, lambda r: r["state"] == "cancelled", timeout_s=60)
        assert cancelled["reason"] == "cancelled on request"
        assert api.cancel(long_run)["state"] == "cancelled"  # idempotent
        assert cancelled["step"] < 100_000

        done = wait_for(api, queued, lambda r: r["state"] in FINAL)
        assert done["state"] == "succeeded" and done["started_at"] >= cancelled["finished_at"]
        with pytest.raises(ApiError) as conflict:
            api.cancel(queued)
        assert conflict.value.status == 409


def test_ps_lost_fails_the_run_and_a_resumed_run_is_stopped(tmp_path, cluster):
    control = ControlProcess(
        tmp_path / "control.db",
        cluster.control_endpoint,
        TOKEN,
        extra_args=("--poll-interval", "0.2", "--lost-after", "2"),
    ).start()
    try:
        with Client(control.url, TOKEN) as api:
            lost = api.submit(TINY | {"name": "lost", "steps": 100_000})["id"]
            queued = api.submit(TINY | {"name": "after-lost", "steps": 10})["id"]
            wait_for(api, lost, lambda r: (r["step"] or 0) >= 12)  # past a checkpoint, so the PS can resume it
            cluster.cluster.kill(cluster.cluster.ps)  # the PS dies without a word
            failed = wait_for(api, lost, lambda r: r["state"] == "failed", timeout_s=30)
            assert "the PS has been unreachable" in failed["reason"] and api.run(queued)["state"] == "queued"
            cluster.cluster.start_ps()  # resumes the unfinished run from its checkpoint
            done = wait_for(api, queued, lambda r: r["state"] in FINAL, timeout_s=120)
            assert done["state"] == "succeeded" and done["step"] == 10
            assert api.run(lost)["state"] == "failed"  # the store's word stood: the PS was told to cancel it
            assert cluster.cluster.client().status()["runs"][lost] == "cancelled"
    finally:
        control.stop()


def test_control_service_speaks_curve_to_the_ps(tmp_path):
    keys = tmp_path / "keys"
    write_keys(keys, clients=2)
    ps = LocalCluster(tmp_path / "state", workers=0, ps_args=("--keys", str(keys)), metrics=False)
    ps.start_ps()
    endpoint, fast = f"tcp://127.0.0.1:{ps.control_port}", ("--poll-interval", "0.2")
    curve = ("--curve-keys", str(keys), "--curve-client", "client-1")
    with_keys = ControlProcess(tmp_path / "a.db", endpoint, TOKEN, extra_args=(*fast, *curve))
    without_keys = ControlProcess(tmp_path / "b.db", endpoint, TOKEN, extra_args=fast)
    try:
        with Client(with_keys.start().url, TOKEN) as api:
            deadline = time.monotonic() + 20
            while not api.ready():
                assert time.monotonic() < deadline, "the control service never reached the PS over CURVE"
                time.sleep(0.2)
            assert api.cluster()["ps"]["state"] == "idle"
        with Client(without_keys.start().url, TOKEN) as api:
            time.sleep(3.0)  # several polls, each unanswered: the PS only talks CURVE to known keys
            assert not api.ready() and not api.cluster()["reachable"]
    finally:
        with_keys.stop()
        without_keys.stop()
        ps.stop()


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_atomo_up_serves_a_cluster_and_stops_it(tmp_path):
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "services", "up", "--workers", "2", "--port", str(port), "--threads", "1"]
        + ["--state-dir", str(tmp_path), "--poll-interval", "0.2", "--log-level", "warning"],
        env={k: v for k, v in os.environ.items() if not k.startswith("ATOMO_")},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [up.stdout.readline() for _ in range(3)]
        exports = dict(line.removeprefix("export ").strip().split("=", 1) for line in lines[1:])
        assert exports["ATOMO_URL"] == f"http://127.0.0.1:{port}" and len(exports["ATOMO_API_TOKEN"]) >= 32
        processes = children_of(up.pid)
        assert len(processes) == 3  # the PS and two workers
        with Client(exports["ATOMO_URL"], exports["ATOMO_API_TOKEN"]) as api:
            deadline = time.monotonic() + 30
            while not api.ready():
                assert time.monotonic() < deadline, "atomo up never became ready"
                time.sleep(0.2)
            with Client(exports["ATOMO_URL"], "wrong") as stranger, pytest.raises(ApiError) as unauthorized:
                stranger.runs()
            assert unauthorized.value.status == 401
            run = wait_for(api, api.submit(TINY | {"steps": 10})["id"], lambda r: r["state"] in FINAL)
            assert run["state"] == "succeeded" and run["step"] == 10
    finally:
        up.terminate()
        assert up.wait(timeout=30) == 0
    assert not [pid for pid in processes if os.path.exists(f"/proc/{pid}")]  # nothing left behind
