"""The scheduler with the Kubernetes launcher: a real PS and worker process on loopback, the Kubernetes API
emulated over real HTTP (kmock), the real scheduler thread and SQLite store.

Checked: a run is submitted only once its `workers` are live at the PS, after one scale request; a run whose
workers never come fails with the launcher's account of the pending pod; an API refusal fails only that run;
the queue left empty scales the workers back to the idle count; GET /v1/cluster's pods come from the API.
And with the real control service over real HTTP: a Kubernetes API that never finishes answering holds
neither a run that has its workers, nor a cancel, nor /readyz.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import wait_until  # noqa: E402
from test_kubernetes_launcher import (  # noqa: E402  (the emulator and the objects of the launcher's tests)
    MAIN,
    NS,
    PODS,
    STATEFULSETS,
    Emulator,
    RawAPI,
    api_client,
    pending_unschedulable,
    pod,
    scale_request,
    statefulset,
)

from services.common.launch import LocalCluster, free_port  # noqa: E402
from services.control import scheduler as scheduler_module  # noqa: E402
from services.control.app import Settings, create_app  # noqa: E402
from services.control.client import Client  # noqa: E402
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


@pytest.mark.parametrize("api_fault", ["malformed", "stuck"])
def test_a_timed_out_wait_fails_its_run_and_the_queue_moves_on_whatever_the_api_does(
    cluster, tmp_path, monkeypatch, api_fault
):
    """The scale is answered, but every read gets `[]` (not an object) or an answer that never ends: the run
    short of workers fails when its wait times out all the same (with the API's failure as the account of its
    pods, or, stuck, without one after EXPLAIN_WAIT_S), and the next run is scaled for and succeeds."""
    monkeypatch.setattr(scheduler_module, "EXPLAIN_WAIT_S", 1.0)

    def answer(method, path):
        if method == "PATCH":
            return 200, json.dumps({"kind": "Scale", "spec": api.requests[-1][4]["spec"]}).encode(), None
        if api_fault == "malformed":
            return 200, b"[]", None
        return 200, json.dumps({"kind": "Status", "padding": "x" * 10_000}).encode(), "head"

    api = RawAPI(answer)
    launcher = KubernetesLauncher(NS, [MAIN], api_client=api_client(api.url), request_timeout_s=300.0)
    sched = Scheduler(
        Store(tmp_path / "control.db"),
        cluster.client(),
        poll_interval_s=0.1,
        scaler=launcher,
        worker_wait_s=2.0,
        release_after_s=600.0,
    )
    sched.start()
    try:
        short = sched.store.create_run({**SPEC, "workers": 2})
        after = sched.store.create_run(SPEC)
        sched.wake()
        run = finished(sched, short["id"])
        assert run["state"] == "failed"
        why = {
            "malformed": f"could not get StatefulSet {NS}/{MAIN}: the Kubernetes API's reply is an array, not a JSON "
            "object",
            "stuck": "the Kubernetes API did not say why within 1 s",
        }[api_fault]
        assert run["error"] == f"1 of 2 workers registered with the PS within 2 s; {why}"
        assert finished(sched, after["id"])["state"] == "succeeded"
        # All or nothing: the short group is scaled back to the idle count (0) at once, although
        # release_after_s is 600 s, before the next run's scale.
        patches = [r[4] for r in api.requests if r[0] == "PATCH"]
        assert patches == [{"spec": {"replicas": 2}}, {"spec": {"replicas": 0}}, {"spec": {"replicas": 1}}]
    finally:
        sched.stop()
        api.close()


class ControlService:
    """The real control app (create_app) served by uvicorn on loopback, in a thread of this process (the
    Kubernetes launcher needs an API client, which `atomo serve` builds only inside a pod)."""

    def __init__(self, settings: Settings, scaler: KubernetesLauncher):
        import uvicorn

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app(settings, scaler=scaler), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="control-service", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the control service to listen")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_a_stuck_kubernetes_api_holds_neither_runs_nor_cancels_nor_readyz(cluster, tmp_path):
    """The API answers the scale to 1 worker at once; every other request (the pod listing from the first
    poll on, the scale to 2) gets an answer a byte every 50 ms that would take minutes, under a request
    deadline of 5 minutes. Meanwhile a run that has its worker trains to the end with its metrics, a run
    waiting for its scale is cancelled, and /readyz says ready: none of it waits for the API."""

    def answer(method, path):
        if method == "PATCH" and api.requests[-1][4] == {"spec": {"replicas": 1}}:
            return 200, json.dumps({"kind": "Scale", "spec": {"replicas": 1}}).encode(), None
        return 200, json.dumps({"kind": "Status", "padding": "x" * 10_000}).encode(), "head"

    api = RawAPI(answer)
    scaler = KubernetesLauncher(NS, [MAIN], api_client=api_client(api.url), request_timeout_s=300.0)
    settings = Settings(
        db_path=str(tmp_path / "control.db"),
        ps_endpoint=f"tcp://127.0.0.1:{cluster.control_port}",
        poll_interval_s=0.1,
        worker_wait_s=600.0,
        release_after_s=600.0,
    )
    service = ControlService(settings, scaler)
    try:
        with Client(service.url) as control:
            wait_until(lambda: any(r[0] == "GET" for r in api.requests), 30, "the pod listing to start")

            trained = control.submit(SPEC)
            run = wait_until(lambda: (r := control.run(trained["id"]))["state"] in FINAL and r, 120, "the run")
            assert run["state"] == "succeeded", run
            assert [r["step"] for r in control.metrics(trained["id"])["records"]] == [1, 2, 3]

            waiting = control.submit({**SPEC, "workers": 2})
            wait_until(lambda: {"spec": {"replicas": 2}} in [r[4] for r in api.requests], 30, "the scale to 2")
            control.cancel(waiting["id"])
            run = wait_until(lambda: (r := control.run(waiting["id"]))["state"] in FINAL and r, 30, "the cancel")
            assert run["state"] == "cancelled", run

            assert control.ready()
            assert control.cluster()["reachable"]
        assert api.delivered == [True]  # only the scale to 1 was answered: the rest is still trickling in
        assert [r[0] for r in api.requests].count("PATCH") == 2
    finally:
        service.stop()
        api.close()
