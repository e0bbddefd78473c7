"""`atomo bench --quick` end to end over an emulated 100 Mbit/s link: a real PS and two workers, each in its own
network namespace; the results folder as services.bench.runner documents it; the links really shaped; the
targets table labelled a smoke test; the report regenerated from the reduced results file; no namespace left
afterwards."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from services.bench.netem import Network, _namespaces

REASON = Network.check()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network emulation unavailable: {REASON}")

BANDWIDTH_MBIT = 100
STEPS = 20
ROOT = Path(__file__).resolve().parents[1]
BENCH_KEYS = {
    "command", "argv", "started", "finished", "machine", "network", "headline_profile", "model", "dataset",
    "workers", "targets", "regime", "lr_rule", "lrs", "phases", "quick", "seeds", "eval_every", "test_size", "load",
}  # fmt: skip
MACHINE_KEYS = {"cpu", "cores", "memory_gib", "os", "python", "torch", "pyzmq", "git_commit"}
CASE_KEYS = {
    "case_id", "label", "family", "biased", "codec", "profile", "bandwidth_mbit", "latency_ms", "workers",
    "momentum", "lr", "downlink", "phase", "steps", "state", "error", "wall_s", "seed", "eval_every", "load",
}  # fmt: skip
RECORD_KEYS = {
    "wall_s", "loss", "bytes_up", "bytes_down", "compute_s", "encode_s", "communication_s", "decode_s",
    "update_s", "step_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, str, int]:
    out = tmp_path_factory.mktemp("bench") / "results"
    argv = ["--quick", "--steps", str(STEPS), "--codecs", "dense,svd", "--bandwidth", str(BANDWIDTH_MBIT)]
    argv += ["--latency", "1", "--no-gradients", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", "bench", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stdout, _ = proc.communicate(timeout=120)
    print(stdout)
    assert proc.returncode == 0, stdout
    return out, stdout, proc.pid


def test_the_results_folder_follows_the_schema(results):
    out, stdout, _ = results
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench) >= BENCH_KEYS
    assert set(bench["machine"]) >= MACHINE_KEYS
    assert bench["quick"] is True and bench["workers"] == 2 and bench["finished"] >= bench["started"]  # ISO 8601
    assert bench["network"]["emulated"] is True and bench["network"]["reason"] is None
    assert bench["network"]["profiles"] == {"custom": {"bandwidth_mbit": BANDWIDTH_MBIT, "latency_ms": 1.0}}
    assert bench["headline_profile"] == "custom"
    assert bench["lrs"] == {"dense": 0.05, "svd s=3": 0.05}
    assert 0 < bench["regime"]["dense_comm_share"]["custom"] < 1
    assert bench["seeds"] == [0] and bench["test_size"] >= 300
    start = bench["load"]["start"]
    assert start["cpus"] >= 1 and start["load_1m"] >= 0 and bench["load"]["end"]["load_1m"] >= 0
    cases = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/case.json"))]
    assert sorted(c["label"] for c in cases) == ["dense", "svd s=3"]
    # each codec's best downlink: dense sends the model down, svd s=3 the two workers' messages
    assert {c["label"]: c["downlink"] for c in cases} == {"dense": "model", "svd s=3": "atoms"}
    for case in cases:
        assert set(case) == CASE_KEYS
        assert case["state"] == "succeeded" and case["error"] is None and case["seed"] == 0
        assert case["load"]["load_1m"] >= 0
        assert case["phase"] == "main" and case["profile"] == "custom" and case["steps"] == STEPS
        folder = out / "runs" / case["case_id"]
        assert {"spec.json", "metrics.jsonl", "summary.json"} <= {p.name for p in folder.iterdir()}
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert all(set(r) >= RECORD_KEYS for r in rows)
        assert rows[-1]["test_accuracy"] is not None
        evals = [r["step"] for r in rows if r.get("test_accuracy") is not None]
        assert evals == list(range(case["eval_every"], STEPS + 1, case["eval_every"]))
        line = (
            rf"\] main +{re.escape(case['label'])} +custom +w2 momentum 0.9 .* seed 0 {STEPS}/{STEPS} steps succeeded"
        )
        assert re.search(line, stdout)  # one progress line per run
    assert "suite ETA" in stdout and "estimated" in stdout and "no gradient study" in stdout
    assert "## Targets (SMOKE TEST" in stdout  # the printed table says what it is
    assert not (out / "gradients.json").exists()


def test_the_links_were_shaped(results):
    """Each step a worker's message crosses its upload and the update (both workers' messages, downlink atoms)
    its download: communication_s >= (bytes_up + bytes_down) / workers / bandwidth. Everything through the
    PS's one link at most: <= (bytes_up + bytes_down) / bandwidth, with slack for the processes' own time."""
    out, _, _ = results
    rate = BANDWIDTH_MBIT * 1e6 / 8
    times = {}
    for label in ("dense-model", "svd-s-3"):
        folder = out / "runs" / f"main-custom-w2-{label}-s0"  # case ids: the codec, its downlink, the seed
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
        rows = [r for r in rows[4:-1] if r["communication_s"] is not None]  # the last step sends no update
        communication = statistics.median(r["communication_s"] for r in rows)
        per_step = statistics.median(r["bytes_up"] + r["bytes_down"] for r in rows)
        times[label] = communication
        if label == "dense-model":
            assert per_step > 0.9e6  # 2 x 247 KB up, the 247 KB model to each of the 2 workers
            assert 0.8 * per_step / 2 / rate <= communication <= 1.5 * per_step / rate + 0.02
    assert times["svd-s-3"] < times["dense-model"] / 5


def test_the_report_regenerates_from_the_reduced_file(results, tmp_path):
    """`python -m services.bench.reduced` then `atomo bench --report-from`: the same targets table."""
    out, stdout, _ = results
    reduced_path = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "services.bench.reduced", str(out), str(reduced_path)], cwd=ROOT, check=True)
    report = tmp_path / "benchmarks.md"
    argv = [sys.executable, "-m", "services", "bench", "--report-from", str(reduced_path), "--report", str(report)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    original = (out / "report.md").read_text().split("## Targets")[1].split("\n## ")[0]
    assert report.read_text().split("## Targets")[1].split("\n## ")[0] == original


def test_no_namespace_is_left(results):
    _, _, pid = results
    assert not [ns for ns in _namespaces() if ns.startswith(f"atomo-bench-{pid}-")]
