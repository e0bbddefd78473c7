"""A run can fail; the PS cannot. Real processes: one PS and one worker, plus a worker of our own (a real
ZeroMQ DEALER speaking the protocol) that registers and heart-beats but never sends a gradient.

The PS runs with a 8 s least step deadline and a 5 s worker timeout, so that a straggler and a run whose
min_workers never join end within seconds (a step of these runs takes milliseconds; the worker's first one,
which loads the data set, well under a second)."""

from __future__ import annotations

import re
import time

import pytest
import torch
from helpers import FakeWorker, strict_json

from atomo_core.data import Split
from services.common.launch import LocalCluster
from services.common.protocol import MsgType
from services.common.spec import RunSpec
from services.ps.evaluate import EvaluationError, Evaluator
from services.ps.rundir import scan_runs

pytestmark = pytest.mark.slow

HEARTBEAT_S = 1.0
STEP_TIMEOUT_S = 8.0
WORKER_TIMEOUT_S = 5.0
RUN_TIMEOUT_S = 90
TINY = {"model": "mlp", "dataset": "digits", "workers": 1, "batch_size": 32, "eval_every": 5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(
        tmp_path_factory.mktemp("failures"),
        workers=1,
        threads=1,
        heartbeat_s=HEARTBEAT_S,
        metrics=False,
        ps_args=("--step-timeout-s", str(STEP_TIMEOUT_S), "--worker-timeout-s", str(WORKER_TIMEOUT_S)),
    )
    c.start()
    yield c
    c.stop()


def run_files(cluster, run_id: str) -> tuple[dict, list[dict], list[dict]]:
    """summary.json, metrics.jsonl and events.jsonl of a run, parsed as strict JSON."""
    path = cluster.state_dir / "runs" / run_id
    summary = strict_json((path / "summary.json").read_text())
    metrics = [strict_json(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    events = [strict_json(line) for line in (path / "events.jsonl").read_text().splitlines()]
    return summary, metrics, events


def run_normally(cluster, run_id: str) -> None:
    """The PS still serves: a normal run afterwards succeeds."""
    cluster.client().call("submit", run_id=run_id, spec=TINY | {"steps": 10})
    run = cluster.wait_for_run(run_id, RUN_TIMEOUT_S)
    assert run["state"] == "succeeded" and run["step"] == 10, run


def test_a_diverging_run_fails_keeps_a_finite_checkpoint_and_writes_its_summary(cluster):
    # The reproducer: 2-bit QSGD over whole tensors at a large step size overflows the MLP in a few
    # steps; the first non-finite value (a loss, the model, a test loss) fails the run.
    spec = TINY | {
        "steps": 200,
        "lr": 10,
        "eval_every": 1,
        "checkpoint_every": 1,
        "codec": {"name": "qsgd", "bits": 2, "bucket_size": 2**32 - 1},
    }
    cluster.client().call("submit", run_id="diverges", spec=spec)
    run = cluster.wait_for_run("diverges", RUN_TIMEOUT_S)
    assert run["state"] == "failed" and run["step"] < 200, run
    assert re.match(r"training diverged at step \d+: .*(non-finite|not finite)", run["error"]), run["error"]
    summary, metrics, events = run_files(cluster, "diverges")
    assert summary["state"] == "failed" and summary["error"] == run["error"]
    assert [r["step"] for r in metrics] == list(range(1, len(metrics) + 1))
    assert events[-1]["type"] == "run_state" and events[-1]["detail"]["error"] == run["error"]
    checkpoint = torch.load(cluster.state_dir / "runs" / "diverges" / "checkpoint.pt", weights_only=True)
    assert 1 <= checkpoint["step"] <= run["step"]
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    status = cluster.client().status()
    assert status["run"]["state"] == "failed"  # the control reply about a diverged run is valid JSON
    run_normally(cluster, "after-diverging")


@pytest.mark.parametrize("blocked", [".checkpoint.pt.tmp", "metrics.jsonl"])
def test_an_exception_inside_a_run_fails_that_run_with_its_cause(cluster, blocked):
    # A directory where the run writes a file (the checkpoint's temporary file, the metrics): the write raises
    # inside the run, on the PS's loop; for metrics.jsonl once more while the run is being failed (its
    # metrics are flushed at the end).
    run_id = f"blocked-{blocked.strip('.').split('.')[0]}"
    (cluster.state_dir / "runs" / run_id / blocked).mkdir(parents=True)
    cluster.client().call("submit", run_id=run_id, spec=TINY | {"steps": 10, "checkpoint_every": 2})
    run = cluster.wait_for_run(run_id, RUN_TIMEOUT_S)
    assert run["state"] == "failed", run
    assert run["error"].startswith("IsADirectoryError in on_gradient:") and blocked in run["error"], run["error"]
    summary = strict_json((cluster.state_dir / "runs" / run_id / "summary.json").read_text())
    assert summary["state"] == "failed" and summary["error"] == run["error"]
    assert cluster.client().status()["runs"][run_id] == "failed"
    run_normally(cluster, f"after-{run_id}")


def test_a_worker_that_never_sends_its_gradient_is_timed_out_and_the_run_finishes(cluster):
    # Three shards, two workers (the real one and the straggler): the run starts short after the grace
    # period and says so; the straggler misses step 0's deadline and leaves; the real worker finishes.
    # The spec (lq with q = inf, TernGrad's norm) is checked to round-trip through the PS protocol, spec.json
    # and summary.json.
    fake = FakeWorker(cluster)
    try:
        fake.serve_for(0.5)
        cluster.wait_for_workers(2)
        submitted = TINY | {"workers": 3, "steps": 20, "codec": {"name": "lq", "q": "inf"}}
        resolved = RunSpec.model_validate(submitted).model_dump(mode="json")
        assert resolved["codec"]["q"] == "inf"
        cluster.client().call("submit", run_id="straggler", spec=submitted)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (run := cluster.client().status()["run"])["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, run
            fake.serve_for(0.2)
    finally:
        fake.close()
    assert run["state"] == "succeeded" and run["step"] == 20, run
    summary, metrics, events = run_files(cluster, "straggler")
    by_type = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e["detail"])
    started_short = by_type["started_with_fewer_workers"][0]["message"]
    assert started_short == "started with 2 of 3 workers; shard 2 waits for workers"
    assert [(d["worker"], d["step"]) for d in by_type["worker_timed_out"]] == [("straggler", 0)]
    assert by_type["worker_timed_out"][0]["waited_s"] >= STEP_TIMEOUT_S
    assert "worker_lost" not in by_type  # it heart-beat all along
    assert summary["workers_at_start"] == 2 and summary["timed_out_workers"] == ["straggler"]
    assert all(r["k"] == 1 for r in metrics)
    runs = [h for h in fake.received if h.type == MsgType.RUN]
    stops = [h for h in fake.received if h.type == MsgType.STOP]
    assert runs and stops and stops[0].meta["reason"] == "timed out"
    spec_json = strict_json((cluster.state_dir / "runs" / "straggler" / "spec.json").read_text())
    assert runs[0].meta["spec"] == spec_json == summary["spec"] == resolved
    assert RunSpec.model_validate(spec_json) == RunSpec.model_validate(submitted)


def test_an_evaluation_that_raises_is_reported_in_the_callers_thread():
    # The evaluator runs in its own thread; an exception there (here: weights of another model) must reach
    # the PS's loop, where the run's guard fails the run with it, and the thread must go on.
    test = Split(torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,)))
    evaluator = Evaluator("mlp", 10, 1, test, torch.device("cpu"))
    try:
        good = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
        evaluator.submit(1, {k: v[..., :1] for k, v in good.items()})
        evaluator.submit(2, good)
        deadline = time.monotonic() + 30
        results, error = [], None
        while len(results) + (error is not None) < 2 and time.monotonic() < deadline:
            try:
                results += evaluator.results()
            except EvaluationError as exc:
                error = exc
            time.sleep(0.01)
    finally:
        evaluator.close()
    assert error is not None and str(error).startswith("evaluation of step 1 failed: RuntimeError:")
    assert [step for step, _accuracy, _loss in results] == [2]


def _collect(evaluator: Evaluator, count: int, timeout_s: float = 30.0) -> list:
    """The evaluator's results until `count` have come (or `timeout_s` has passed)."""
    deadline, results = time.monotonic() + timeout_s, []
    while len(results) < count and time.monotonic() < deadline:
        results += evaluator.results()
        time.sleep(0.01)
    return results


def test_a_deferred_evaluator_evaluates_only_after_release():
    # RunSpec.eval_deferred: the weights copied at each evaluation step wait until the run's last step, so that
    # no evaluation takes CPU from the steps a benchmark times; then every one is evaluated, in step order.
    test = Split(torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,)))
    evaluator = Evaluator("mlp", 10, 1, test, torch.device("cpu"), deferred=True)
    try:
        state = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
        for step in (5, 10, 15):
            evaluator.submit(step, {k: v.clone() for k, v in state.items()})
        time.sleep(0.5)
        assert evaluator.results() == []  # nothing evaluated before the release
        evaluator.release()
        results = _collect(evaluator, 3)
    finally:
        evaluator.close()
    assert [step for step, _accuracy, _loss in results] == [5, 10, 15]
    assert len({accuracy for _step, accuracy, _loss in results}) == 1  # the same weights, the same accuracy


def test_a_deferred_evaluator_holds_bounded_copies(monkeypatch):
    # A spec comes from the network: many evaluation steps of a large model must not pile up weight copies in
    # the PS until it runs out of memory. Past MAX_DEFERRED_BYTES the evaluator starts evaluating at once.
    from services.ps import evaluate

    test = Split(torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,)))
    evaluator = Evaluator("mlp", 10, 1, test, torch.device("cpu"), deferred=True)
    state = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
    copy_bytes = sum(t.numel() * t.element_size() for t in state.values())
    monkeypatch.setattr(evaluate, "MAX_DEFERRED_BYTES", 2 * copy_bytes)
    try:
        evaluator.submit(5, {k: v.clone() for k, v in state.items()})
        evaluator.submit(10, {k: v.clone() for k, v in state.items()})
        assert not evaluator.released.is_set() and evaluator.held_bytes == 2 * copy_bytes
        evaluator.submit(15, {k: v.clone() for k, v in state.items()})  # a third copy would exceed the bound
        assert evaluator.released.is_set() and evaluator.released_early
        results = _collect(evaluator, 3)
    finally:
        evaluator.close()
    assert [step for step, _accuracy, _loss in results] == [5, 10, 15]


def test_unreadable_summaries_mark_their_runs_failed_instead_of_stopping_the_ps(tmp_path):
    # scan_runs runs when the PS starts: a summary.json it cannot read must not keep the PS from starting,
    # nor make a finished run look unfinished (it would be resumed).
    runs = tmp_path / "runs"
    for run_id in ("good", "a-list", "a-folder", "not-json", "unfinished"):
        (runs / run_id).mkdir(parents=True)
        (runs / run_id / "spec.json").write_text("{}")
    (runs / "good" / "summary.json").write_text('{"run_id": "good", "state": "succeeded"}')
    (runs / "a-list" / "summary.json").write_text("[1, 2]")
    (runs / "a-folder" / "summary.json").mkdir()
    (runs / "not-json" / "summary.json").write_bytes(b"\xff{")
    finished, unfinished = scan_runs(tmp_path)
    assert unfinished == ["unfinished"]
    assert finished["good"]["state"] == "succeeded"
    for run_id in ("a-list", "a-folder", "not-json"):
        assert finished[run_id]["state"] == "failed", finished[run_id]
        assert finished[run_id]["error"].startswith("summary.json unreadable: "), finished[run_id]


def test_a_run_whose_min_workers_never_join_fails_with_the_reason(cluster):
    cluster.client().call("submit", run_id="too-few", spec=TINY | {"workers": 3, "min_workers": 3, "steps": 5})
    run = cluster.wait_for_run("too-few", RUN_TIMEOUT_S)
    assert run["state"] == "failed" and run["step"] == 0, run
    assert re.fullmatch(r"fewer than min_workers=3 workers \([12]\) for 5 s: the run never started", run["error"]), run[
        "error"
    ]
    run_normally(cluster, "after-too-few")
