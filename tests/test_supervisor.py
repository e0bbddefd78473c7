"""The supervisor of `atomo up` with real processes, over real HTTP to its control service: a killed worker
is restarted and takes its shard again mid-run; a run that started with fewer workers than asked says so in
`atomo status` and `atomo runs` (which shows each run's model and codec); a PS that hangs mid-run (SIGSTOP:
alive but silent) is killed and restarted, and the run resumes and succeeds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import wait_until

from services.cli import main
from services.common.launch import free_port
from services.control.client import Client

pytestmark = pytest.mark.slow

FINAL = ("succeeded", "failed", "cancelled")
LIVENESS_TIMEOUT_S = 8.0
MLP = {"model": "mlp", "batch_size": 32, "eval_every": 100, "checkpoint_every": 50}


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """`atomo up --workers 1`: a supervised PS, one worker and the control service; (api, url, token)."""
    folder = tmp_path_factory.mktemp("up")
    log = folder / "up.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ATOMO_")}, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services", "up", "--workers", "1", "--threads", "1", "--port", str(free_port())]
            + ["--state-dir", str(folder / "state"), "--poll-interval", "0.2", "--log-level", "warning"]
            + ["--ps-liveness-timeout-s", str(LIVENESS_TIMEOUT_S)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        text = wait_until(lambda: "# the token" in log.read_text() and log.read_text(), 90, "atomo up's output", 0.2)
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.MULTILINE))
        url, token = exports["ATOMO_URL"], exports["ATOMO_API_TOKEN"]
        with Client(url, token) as api:
            wait_until(api.ready, 60, "ready", 0.2)
            yield api, url, token
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def events_of(api: Client, run_id: str, kind: str) -> list[dict]:
    return [e for e in api.events(run_id)["events"] if e["type"] == kind]


def test_a_short_run_says_so_and_a_killed_worker_is_restarted_and_rejoins(up, monkeypatch, capsys):
    api, url, token = up
    monkeypatch.setenv("ATOMO_URL", url)
    monkeypatch.setenv("ATOMO_API_TOKEN", token)
    spec = MLP | {"workers": 2, "min_workers": 1, "steps": 300, "codec": {"name": "qsgd", "bits": 4}}
    run_id = api.submit(spec)["id"]
    # After the start grace (10 s) the run starts with the one worker there is.
    run = wait_until(
        lambda: (r := api.run(run_id))["state"] == "running" and (r["step"] or 0) >= 5 and r, 90, "training", 0.2
    )
    assert run["workers_at_start"] == 1 and run["workers_training"] == 1
    assert main(["status", run_id, "--once"]) == 0
    status = capsys.readouterr().out
    assert "workers 1/2" in status and "started with 1 of 2 workers" in status, status
    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith(run_id))
    assert " 1/2 " in row and row.split()[2:4] == ["mlp", "qsgd"], listing
    assert f"started with fewer workers than requested: {run_id}" in listing

    (worker,) = api.cluster()["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    restarted = wait_until(lambda: events_of(api, run_id, "worker_restarted"), 60, "the restart", 0.2)
    assert restarted[0]["detail"]["worker"] == worker["id"] and restarted[0]["detail"]["pid"] != worker["pid"]
    assert events_of(api, run_id, "worker_exited")[0]["detail"]["exit_status"] == -signal.SIGKILL
    done = wait_until(lambda: (r := api.run(run_id))["state"] in FINAL and r, 180, "the run to end", 0.2)
    assert done["state"] == "succeeded" and done["step"] == 300, (done["error"], api.events(run_id)["events"])
    # The PS finds the worker lost (worker_lost, then worker_joined) or, when the restart registers within three
    # heartbeat intervals of the kill, hands the new process its predecessor's shard: either way, worker_rejoined.
    new_pid = restarted[0]["detail"]["pid"]
    rejoined = [e for e in events_of(api, run_id, "worker_rejoined") if e["detail"]["pid"] == new_pid]
    assert rejoined and rejoined[0]["detail"]["worker"] == worker["id"], api.events(run_id)["events"]
    if rejoined[0]["detail"]["was"] == "lost":
        assert any(e["seq"] > rejoined[0]["seq"] for e in events_of(api, run_id, "worker_joined")), "no shard again"
    else:
        assert rejoined[0]["detail"]["was"] == "training" and not events_of(api, run_id, "worker_lost")


def test_a_ps_that_hangs_mid_run_is_killed_and_restarted_and_the_run_resumes(up):
    api, _, _ = up
    run_id = api.submit(MLP | {"workers": 1, "steps": 300})["id"]
    wait_until(lambda: (api.run(run_id)["step"] or 0) >= 60, 90, "step 60", 0.2)
    hung = api.cluster()["ps"]["process"]
    os.kill(hung["pid"], signal.SIGSTOP)  # alive, but its loop answers nothing
    exited = wait_until(lambda: events_of(api, run_id, "ps_exited"), 60, "the hung PS to be killed", 0.2)
    assert exited[0]["detail"]["exit_status"] == -signal.SIGKILL
    assert exited[0]["detail"]["cause"].startswith("hung: its control port did not answer"), exited
    wait_until(lambda: events_of(api, run_id, "resumed"), 60, "the run to resume", 0.2)
    assert api.cluster()["ps"]["process"]["pid"] != hung["pid"]
    done = wait_until(lambda: (r := api.run(run_id))["state"] in FINAL and r, 180, "the run to end", 0.2)
    assert done["state"] == "succeeded" and done["step"] == 300, done
