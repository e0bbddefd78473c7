"""The scheduler with the Kubernetes launcher: a real PS and worker process on loopback, the Kubernetes API
emulated over real HTTP (kmock), the real scheduler thread and SQLite store.

Checked: a run is submitted only once its `workers` are live at the PS, after one scale request; a run whose
workers never come fails with the launcher's account of the pending pod; an API refusal fails only that run;
the queue left empty scales the workers back to the idle count; GET /v1/cluster's pods come from the API.
"""

from __future__ import annotations

import time

import pytest
from helpers import wait_until  # noqa: E402
from test_kubernetes_launcher import (  # noqa: E402  (the emulator and the objects of the launcher's tests)
    MAIN,
    NS,
    PODS,
    STATEFULSETS,
    Emulator,
    api_client,
    pending_unschedulable,
    pod,
    scale_request,
    statefulset,
)

from services.common.launch import LocalCluster  # noqa: E402
from services.control.kubernetes import KubernetesLauncher  # noqa: E402
from services.control.scheduler import Scheduler  # noqa: E402
from services.control.store import FINAL, Store  # noqa: E402

pytestmark = pytest.mark.slow

SPEC = {"model": "mlp", "workers": 1, "batch_size": 16, "steps": 3, "eval_every": 3, "codec": {"name": "svd"}}


def scale_requests(emulator: Emulator) -> list[tuple]:
    return [r for r in emulator.requests() if r[0] == "PATCH"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("ps"), workers=1, metrics=False) as c:
        yield c


@pytest.fixture
def emulator():
    emu = Emulator()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def scheduler(cluster, emulator, tmp_path):
    emulator.put(STATEFULSETS, MAIN, statefulset(replicas=0))
    emulator.put(PODS, f"{MAIN}-0", pod(f"{MAIN}-0"))
    emulator.put(PODS, f"{MAIN}-1", pending_unschedulable(f"{MAIN}-1"))
    launcher = KubernetesLauncher(NS, [MAIN], api_client=api_client(emulator.url), request_timeout_s=5.0)
    sched = Scheduler(
        Store(tmp_path / "control.db"),
        cluster.client(),
        poll_interval_s=0.1,
        scaler=launcher,
        worker_wait_s=3.0,
        release_after_s=0.5,
    )
    sched.start()
    try:
        yield sched
    finally:
        sched.stop()


def finished(scheduler: Scheduler, run_id: str, timeout_s: float = 90.0) -> dict:
    store = Store(scheduler.store.path)
    try:
        return wait_until(lambda: (r := store.get_run(run_id))["state"] in FINAL and r, timeout_s, f"run {run_id}")
    finally:
        store.close()


def test_runs_are_scaled_for_waited_for_and_released(scheduler, emulator):
    store = scheduler.store
    ok = store.create_run(SPEC)
    scheduler.wake()
    run = finished(scheduler, ok["id"])
    assert run["state"] == "succeeded", run
    requested = [e for e in store.events(ok["id"], 0, 100) if e["type"] == "workers_requested"]
    assert [e["detail"] for e in requested] == [{"workers": 1, "statefulsets": {MAIN: 1}}]
    assert scale_requests(emulator)[0] == scale_request(MAIN, 1)

    # The queue is empty: after release_after_s the workers go back to the idle count (0), once.
    wait_until(lambda: scale_request(MAIN, 0) in scale_requests(emulator), 10, "the scale-down")
    time.sleep(1.0)
    assert scale_requests(emulator) == [scale_request(MAIN, 1), scale_request(MAIN, 0)]

    # GET /v1/cluster's pods: listed from the API, the pending one with the scheduler's reason.
    pods = wait_until(lambda: scheduler.pods, 10, "the pod listing")
    by_name = {p["name"]: p for p in pods}
    assert by_name[f"{MAIN}-0"]["ready"] and by_name[f"{MAIN}-0"]["reason"] is None
    assert "Insufficient nvidia.com/gpu" in by_name[f"{MAIN}-1"]["reason"]


def test_a_run_whose_workers_never_come_fails_with_the_pending_pods_reason(scheduler, emulator):
    short = scheduler.store.create_run({**SPEC, "workers": 2, "batch_size": 16})
    after = scheduler.store.create_run(SPEC)
    scheduler.wake()
    run = finished(scheduler, short["id"])
    assert run["state"] == "failed"
    assert run["error"].startswith("1 of 2 workers registered with the PS within 3 s; ")
    assert f"pod {MAIN}-1 is Pending: Unschedulable: 0/3 nodes are available" in run["error"]
    assert scale_requests(emulator)[0] == scale_request(MAIN, 2)
    assert finished(scheduler, after["id"])["state"] == "succeeded"  # the queue goes on


def test_an_api_refusal_fails_that_run_only(scheduler, emulator):
    import kmock

    forbidden = kmock.KubernetesError(status=403, reason="Forbidden", message="scale is forbidden for sa")
    emulator.react(("patch", STATEFULSETS), forbidden)
    refused = scheduler.store.create_run(SPEC)
    scheduler.wake()
    run = finished(scheduler, refused["id"])
    assert run["state"] == "failed"
    assert "the workers could not be scaled" in run["reason"] and "403" in run["error"]
    assert "scale is forbidden for sa" in run["error"]
    assert scheduler._thread.is_alive()
