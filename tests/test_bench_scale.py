"""services.bench.scale: upload and download fitted apart, the held-out test (fit on 2 and 3 workers, predict 4)
on recorded runs (tests/data/bench-scale), and the report's held-out section and Table 6 row."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from services.bench import scale
from services.bench.report import write_report
from services.report import load_metrics

DATA = Path(__file__).parent / "data"


def synthetic(workers: int, label: str, downlink: str, nbytes: float, truth: dict) -> scale.RunTiming:
    """A run whose step time is exactly the model's with the parameters `truth`."""
    up = workers * nbytes
    down = workers * workers * nbytes if downlink == "atoms" else workers * truth["model_bytes"]
    decode = truth["decode"][label] * workers
    apply = decode + truth["update"] if downlink == "atoms" else 0.0
    compute = truth["a"] + truth["b"] / workers
    step = compute + truth["encode"][label] + up / truth["r_up"] + down / truth["r_down"] + decode
    step += truth["update"] + apply + truth["o"]
    return scale.RunTiming(
        f"{label}-{workers}-{downlink}", label, "scale", "custom", workers, downlink, 1.25e7, 0.0,
        compute, truth["encode"][label], decode, truth["update"], step, float(workers), up, down,
    )  # fmt: skip


TRUTH = {
    "a": 0.01, "b": 0.04, "update": 0.003, "o": 0.002, "r_up": 1.0e7, "r_down": 4.0e6, "model_bytes": 2.5e5,
    "encode": {"dense": 0.0005, "svd s=3": 0.02}, "decode": {"dense": 0.001, "svd s=3": 0.004},
}  # fmt: skip


def test_the_fit_recovers_upload_and_download_rates_apart():
    runs = [
        synthetic(n, label, downlink, nbytes, TRUTH)
        for n in (2, 3, 4)
        for label, nbytes in (("dense", 2.5e5), ("svd s=3", 2e4))
        for downlink in ("atoms", "model")
    ]
    cal = scale.fit(runs)
    link = cal.links["custom"]
    assert link.rate_up_bps == pytest.approx(TRUTH["r_up"], rel=1e-6)
    assert link.rate_down_bps == pytest.approx(TRUTH["r_down"], rel=1e-6)
    assert link.overhead_s == pytest.approx(TRUTH["o"], abs=1e-9)
    assert link.efficiency_up == pytest.approx(0.8) and link.efficiency_down == pytest.approx(0.32)
    for r in runs:
        assert scale.predict_run(r, cal) == pytest.approx(r.step_s, rel=1e-6)
    # held out: fitted on 2 and 3 workers, the 4-worker runs are predicted exactly (the model is the truth here)
    cal, tested = scale.held_out(runs, (2, 3), (4,))
    assert {h.run.workers for h in tested} == {4} and len(tested) == 4
    assert max(abs(h.error) for h in tested) < 1e-6
    assert set(scale.held_out_errors(tested)) == {"dense", "svd s=3"}
    with pytest.raises(ValueError, match="no run with"):
        scale.held_out([r for r in runs if r.workers < 4], (2, 3), (4,))


def recorded() -> list[scale.RunTiming]:
    out = []
    for folder in sorted((DATA / "bench-scale" / "runs").iterdir()):
        case = json.loads((folder / "case.json").read_text())
        out.append(scale.run_timing(case, load_metrics(folder / "metrics.jsonl")))
    return out


def test_held_out_on_recorded_runs():
    """Real loopback runs at 2, 3 and 4 workers (LeNet-5, digits). On loopback the step time is mostly CPU on a
    2-core machine shared with other work, and identical runs differ by up to ~40% (tests/test_bench_report.py),
    so the bound is loose: the median held-out error within 30%, every run within 90%."""
    runs = recorded()
    assert sorted({r.workers for r in runs}) == [2, 3, 4]
    cal, tested = scale.held_out(runs, (2, 3), (4,))
    assert {h.run.label for h in tested} == {"dense", "svd s=3", "qsgd b=4"} and len(tested) == 4
    errors = [abs(h.error) for h in tested]
    assert statistics.median(errors) < 0.3 and max(errors) < 0.9, errors
    assert cal.compute_s(2) > 0 and cal.links["loopback"].overhead_s >= 0


def test_predict_uses_each_direction_and_the_forced_downlink():
    svd = scale.CodecCost("svd s=3", 0.46e6, 0.136, 0.010)
    args = dict(compute_s=0.025, update_s=0.03, dense_bytes=39e6)
    same = scale.predict(svd, 16, 1.25e8, **args)
    slow_down = scale.predict(svd, 16, 1.25e8, down_rate_bps=1.25e7, **args)
    assert slow_down.step_s > same.step_s
    forced = scale.predict(svd, 16, 1.25e8, downlinks=("model",), **args)
    assert forced.downlink == "model" and forced.step_s >= same.step_s
    with pytest.raises(ValueError, match="downlinks"):
        scale.predict(svd, 16, 1.25e8, downlinks=("bcast",), **args)


def test_report_has_the_held_out_test_and_the_table6_row(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(DATA / "bench-sample", results)
    for folder in (DATA / "bench-scale" / "runs").iterdir():
        shutil.copytree(folder, results / "runs" / folder.name)
    markdown = write_report(results, tmp_path / "docs" / "benchmarks.md").read_text()
    section = markdown[markdown.index("### Held out: fitted on 2 and 3 workers, predicting 4") :]
    assert "scale-w4-svd-s3" in section and "Mean absolute held-out error per codec" in section
    table6 = markdown[markdown.index("### The paper's Table 6 configuration") :]
    assert "VGG-11-BN, 16 workers, 1 Gbit/s, model downlink" in table6 and "ASSUMED" in table6
    assert "3.96x" in table6 and "1.68x" in table6
    assert "an ASSUMPTION, not measured" in markdown  # no GPU measurement in the sample's study
