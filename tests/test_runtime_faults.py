"""Fault tolerance with real processes: a worker SIGKILLed mid-run, then restarted; the PS SIGKILLed mid-run,
then restarted on its state directory. One PS and three workers serve both tests."""

import json
import signal
import time

import pytest
from helpers import wait_until

from services.common.launch import LocalCluster

pytestmark = pytest.mark.slow

HEARTBEAT_S = 1.0
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("faults"), workers=3, threads=1, heartbeat_s=HEARTBEAT_S)
    c.start()
    yield c
    c.stop()


def run_step(cluster) -> int:
    run = cluster.client().status()["run"]
    return run["step"] if run else -1


def events(cluster, run_id: str) -> list[dict]:
    return cluster.client().call("events", run_id=run_id, since=0)["events"]


def test_a_killed_worker_is_detected_the_run_goes_on_and_a_restarted_one_rejoins(cluster):
    run_id = "worker-kill"
    spec = {"steps": 400, "workers": 3, "min_workers": 2, "eval_every": 400, "codec": {"name": "svd"}}
    cluster.client().call("submit", run_id=run_id, spec=spec)
    wait_until(lambda: run_step(cluster) >= 20, 60, "step 20")
    victim = cluster.workers["worker-2"]
    killed_at = time.time()
    cluster.kill(victim, signal.SIGKILL)
    lost = wait_until(
        lambda: [e for e in events(cluster, run_id) if e["type"] == "worker_lost"], 10 * HEARTBEAT_S, "the loss"
    )
    assert lost[0]["detail"]["worker"] == "worker-2"
    # Detected within three heartbeat intervals of the worker's last message (plus slack for a loaded machine).
    assert lost[0]["time"] - killed_at <= 3 * HEARTBEAT_S + 1.0
    step_at_loss = run_step(cluster)
    wait_until(lambda: run_step(cluster) >= step_at_loss + 20, 30, "progress with two workers")
    cluster.start_worker("worker-2")
    rejoined = wait_until(
        lambda: [
            e
            for e in events(cluster, run_id)
            if e["type"] == "worker_joined" and e["detail"]["worker"] == "worker-2" and e["seq"] > lost[0]["seq"]
        ],
        60,
        "the rejoin",
    )
    run = cluster.wait_for_run(run_id, RUN_TIMEOUT_S)
    assert run["state"] == "succeeded" and run["step"] == 400
    records = cluster.client().call("metrics", run_id=run_id, since=0)["records"]
    assert [r["step"] for r in records] == list(range(1, 401))
    after = [r for r in records if r["time"] > rejoined[0]["time"] + 1.0]
    assert after and all(r["k"] == 3 for r in after[-20:]), "the restarted worker does not contribute"
    assert any(r["k"] == 2 for r in records), "no step ran on the two survivors"


def test_a_killed_ps_restarts_and_resumes_from_its_checkpoint(cluster):
    run_id = "ps-kill"
    spec = {"steps": 400, "workers": 3, "checkpoint_every": 25, "eval_every": 400, "codec": {"name": "svd"}}
    cluster.wait_for_workers(3)
    cluster.client().call("submit", run_id=run_id, spec=spec)
    wait_until(lambda: run_step(cluster) >= 60, 60, "step 60")
    cluster.kill(cluster.ps, signal.SIGKILL)
    checkpoint = cluster.state_dir / "runs" / run_id / "checkpoint.pt"
    assert checkpoint.exists()
    cluster.start_ps()  # the same ports and state directory; the workers reconnect by themselves
    resumed = wait_until(lambda: [e for e in events(cluster, run_id) if e["type"] == "resumed"], 30, "the resume event")
    resumed_step = resumed[0]["detail"]["step"]
    assert resumed_step >= 50 and resumed_step % 25 == 0
    run = cluster.wait_for_run(run_id, RUN_TIMEOUT_S)
    assert run["state"] == "succeeded" and run["step"] == 400
    records = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 401)), "steps lost or repeated across the restart"
    assert records[-1]["wall_s"] > records[resumed_step - 1]["wall_s"]
