"""`atomo bench`'s report and scale model on the recorded sample (tests/data/bench-sample: real loopback runs),
and the reduced results file it regenerates from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from services.bench import reduced, scale, suite
from services.bench.report import compare, evaluate_targets, load_results, write_report
from services.report import load_metrics

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "bench-sample"
SECTIONS = (
    "## How it was run",
    "## Targets",
    "## Time to accuracy at the headline profile",
    "## Time to accuracy at the other profiles (PROJECTED)",
    "## Momentum on (0.9) and off",
    "## The time split per step",
    "### Bytes per message",
    "## Downlink: `atoms` against `model`",
    "## Variance per byte on ResNet-18 and VGG-11-BN gradients",
    "## Theorem 6 per layer",
    "## The singular value spectrum over training",
    "## Reshape policies: `rows` against `paper`",
    "## Scale beyond this machine",
    "### Fit residuals (in-sample): predicted against measured",
    "### Predicted speed-up over dense per step, 8 to 256 workers",
    "### Where the single PS becomes the bottleneck",
    "## Runs",
)


def records(case_id: str) -> list[dict]:
    return load_metrics(SAMPLE / "runs" / case_id / "metrics.jsonl")


def time_to(rs: list[dict], target: float) -> float | None:
    """Independently of services.report: from the end of the first step to the first evaluation >= target."""
    hit = next((r for r in rs if r.get("test_accuracy") is not None and r["test_accuracy"] >= target), None)
    return None if hit is None else hit["wall_s"] - rs[0]["wall_s"]


def table_row(markdown: str, heading: str, first_cell: str) -> list[str]:
    """The cells of the first table row starting with `first_cell` after `heading`."""
    section = markdown[markdown.index(heading) :]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} after {heading!r}")


def table_header(markdown: str, heading: str) -> list[str]:
    section = markdown[markdown.index(heading) :]
    line = next(line for line in section.splitlines() if line.startswith("|"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, str]:
    report = tmp_path_factory.mktemp("docs") / "benchmarks.md"
    assert write_report(SAMPLE, report) == report
    return report, report.read_text(encoding="utf-8")


def test_every_section_and_valid_pngs(generated):
    report, markdown = generated
    for heading in SECTIONS:
        assert heading in markdown, heading
    assert "do not edit by hand" in markdown and "loopback, not emulated" in markdown
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    # accuracy (momentum off and on), time split, bytes, variance, spectrum, scale (no other profile here)
    assert len(images) == 7
    for link in images:
        path = report.parent / link
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, link
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert 300 < width < 4000 and 200 < height < 4000, (link, width, height)
    assert sorted(p.name for p in (report.parent / "benchmarks").iterdir()) == sorted(Path(i).name for i in images)


def test_time_to_target_and_speedups_equal_the_records(generated):
    _, markdown = generated
    bench = json.loads((SAMPLE / "bench.json").read_text())
    heading = "### momentum 0.9"
    labels = table_header(markdown, heading)[1:]
    assert labels == ["dense", "svd s=3", "svd s=3 paper", "qsgd b=4"]
    case_ids = {"dense": "main-dense", "svd s=3": "main-svd-s3", "svd s=3 paper": "main-svd-s3-paper"}
    case_ids["qsgd b=4"] = "main-qsgd-b4"
    checked = 0
    for target in bench["targets"]:
        row = table_row(markdown, heading, f"{100 * target:.1f}%")
        dense = time_to(records("main-dense"), target)
        for label, cell in zip(labels, row[1:], strict=True):
            t = time_to(records(case_ids[label]), target)
            if t is None:
                assert cell.startswith("- (0/1 reached)"), cell
                continue
            time_text, speedup_text = re.fullmatch(r"([\d.]+) s(?: \((.+)\))?", cell).groups()
            assert float(time_text) == pytest.approx(t, abs=0.006)
            if label == "dense":
                assert speedup_text is None
            elif dense is None:
                assert speedup_text.startswith("> ")  # dense's run length bounds its time
            else:
                assert float(speedup_text.rstrip("x")) == pytest.approx(dense / t, abs=0.006)
            checked += 1
    assert checked >= 8
    final = table_row(markdown, heading, "svd s=3")
    last_eval = [r for r in records("main-svd-s3") if r.get("test_accuracy") is not None][-1]
    assert final[1:5] == ["1", "0.05", "atoms", f"{100 * last_eval['test_accuracy']:.1f}%"]


def test_targets_recomputed(generated):
    """Each bar row's speed-up and its split equal the records' times, steps and step times, and the cause of a
    miss names the factor below the bar."""
    _, markdown = generated
    res = load_results(SAMPLE)
    targets = [0.4, 0.6, 0.8]
    rows = evaluate_targets(res, targets, "loopback")
    on = [r for r in rows if r["setting"] == "momentum 0.9"]
    off = [r for r in rows if r["setting"].startswith("momentum off")]
    # momentum 0.9: svd vs dense and vs qsgd b=4 at each target; momentum off: svd vs dense (no QSGD run)
    assert len(on) == 6 and len(off) == 3
    top = {
        lb: time_to(records(cid), 0.8)
        for lb, cid in (("svd s=3", "main-svd-s3"), ("svd s=3 paper", "main-svd-s3-paper"))
    }
    svd = min(top, key=lambda lb: (top[lb] if top[lb] is not None else float("inf"), lb))
    svd_id = {"svd s=3": "main-svd-s3", "svd s=3 paper": "main-svd-s3-paper"}[svd]
    checked = 0
    for row in on:
        assert row["comparison"].startswith(f"{svd} vs ")
        base_id = "main-dense" if row["comparison"].endswith("dense") else "main-qsgd-b4"
        base, codec = records(base_id), records(svd_id)
        tb, tc = time_to(base, row["target"]), time_to(codec, row["target"])
        if tc is None:
            assert row["result"] == "missed" and row["speedup"] is None and "did not reach" in row["cause"]
            continue
        step_b = (base[-1]["wall_s"] - base[0]["wall_s"]) / (len(base) - 1)
        step_c = (codec[-1]["wall_s"] - codec[0]["wall_s"]) / (len(codec) - 1)
        if tb is None:  # the baseline's run length bounds its time
            assert row["value"].startswith("> ") and row["split"].startswith("- x ")
        else:
            assert row["speedup"] == pytest.approx(tb / tc, rel=1e-9)
            steps = [
                next(r["step"] for r in rs if (r.get("test_accuracy") or 0) >= row["target"]) - rs[0]["step"]
                for rs in (base, codec)
            ]
            assert row["split"] == f"{steps[0] / steps[1]:.2f}x x {step_b / step_c:.2f}x"
        bar = suite.MATCH_DENSE if row["comparison"].endswith("dense") else suite.MATCH_QSGD
        if row["speedup"] < bar:
            assert row["result"] == "missed"
            assert ("per-step ratio" in row["cause"]) == (step_b / step_c < bar), row
        checked += 1
    assert checked >= 2
    assert "## Targets" in markdown and "steps ratio x per-step ratio" in markdown and "SMOKE TEST" in markdown


def test_compare_takes_medians_over_seeds():
    """Three seeds: the median time, the per-seed paired range and a seed that misses counting as latest."""

    def run(seed: int, step_s: float, hit: int | None) -> object:
        rs = [
            {"step": s, "wall_s": s * step_s, "bytes_up": 1, "bytes_down": 1, "dense_bytes": 1, "loss": 1.0}
            for s in range(1, 41)
        ]
        for r in rs[4::5]:
            r["test_accuracy"] = 0.9 if hit is not None and r["step"] >= hit else 0.1
        from services.bench.report import Case

        return Case({"state": "succeeded", "seed": seed, "label": "x"}, rs)

    dense = [run(0, 0.10, 20), run(1, 0.12, 25), run(2, 0.11, 20)]
    codec = [run(0, 0.02, 30), run(1, 0.03, 20), run(2, 0.02, None)]
    c = compare(dense, codec, 0.5)
    # dense times (to steps 20, 25, 20 from step 1): 1.9, 2.88, 2.09 -> median 2.09; codec: 0.58, 0.57, inf -> 0.58
    assert c["speedup"] == pytest.approx(2.09 / 0.58)
    assert sorted(c["paired"]) == pytest.approx(sorted([1.9 / 0.58, 2.88 / 0.57]))
    assert c["steps_ratio"] == pytest.approx(19 / 29) and c["step_ratio"] == pytest.approx(0.11 / 0.02)
    assert compare(dense, [run(0, 0.02, None), run(1, 0.02, None), run(2, 0.02, 30)], 0.5)["speedup"] is None


def test_headline_profile_and_best_downlink():
    shares = {"1gbit": 0.45, "100mbit": 0.81, "edge": 0.95}
    bandwidths = {"1gbit": 1000, "100mbit": 100, "edge": 20}
    assert suite.headline_profile(shares, bandwidths) == "100mbit"  # the fastest link in the regime
    assert suite.headline_profile({"1gbit": 0.45, "100mbit": 0.6}, bandwidths) == "100mbit"  # none: the largest
    with pytest.raises(ValueError, match="communication share"):
        suite.headline_profile({"1gbit": None}, bandwidths)
    assert suite.best_downlink(247_000, 247_000, 2) == "model"
    assert suite.best_downlink(14_000, 247_000, 2) == "atoms"
    assert suite.best_downlink(100_000, 247_000, 3) == "model"


def test_the_lr_grid_goes_on_doubling_while_its_largest_is_the_best():
    """Interior optimum: chosen, nothing more to try. Best at the top: twice it next, until LR_EXTENSIONS
    doublings above the grid; a failed (-1) larger lr leaves the best where it was; ties keep the smaller lr."""
    top, top_off = max(suite.LR_GRID), max(suite.LR_GRID_MOMENTUM_OFF)
    interior = {lr: acc for lr, acc in zip(suite.LR_GRID, (0.6, 0.7, 0.65), strict=True)}
    rising = {lr: acc for lr, acc in zip(suite.LR_GRID_MOMENTUM_OFF, (0.6, 0.62, 0.64), strict=True)}
    best, more = suite.choose_lrs({("dense", 0.9): interior, ("svd s=3", 0.0): rising})
    assert best == {("dense", 0.9): suite.LR_GRID[1], ("svd s=3", 0.0): top_off}
    assert more == {("svd s=3", 0.0): 2 * top_off}
    rising[2 * top_off] = -1.0  # the doubled lr diverged
    assert suite.choose_lrs({("svd s=3", 0.0): rising}) == ({("svd s=3", 0.0): top_off}, {})
    climbing = {lr: 0.5 + lr for lr in [*suite.LR_GRID, *(top * 2**k for k in range(1, suite.LR_EXTENSIONS + 1))]}
    best, more = suite.choose_lrs({("qsgd b=4", 0.9): climbing})
    assert best == {("qsgd b=4", 0.9): top * 2**suite.LR_EXTENSIONS} and more == {}  # the extensions are spent
    assert suite.choose_lrs({("topk", 0.9): dict.fromkeys(suite.LR_GRID, 0.7)})[0] == {
        ("topk", 0.9): min(suite.LR_GRID)
    }


def test_the_committed_report_is_what_the_committed_results_give(tmp_path, monkeypatch):
    """docs/benchmarks.md is generated: from docs/benchmarks/bench.json the code writes it again, byte for byte,
    and the plots it names are committed beside it (so a report edited by hand, or code that no longer renders
    the committed figures the same way, fails here)."""
    monkeypatch.chdir(ROOT)  # the report names its source as given: the relative path the docs were made with
    docs = Path("docs")
    written = write_report(docs / "benchmarks" / "bench.json", tmp_path / "benchmarks.md")
    assert written.read_text(encoding="utf-8") == (docs / "benchmarks.md").read_text(encoding="utf-8")
    for png in re.findall(r"\(benchmarks/([\w.-]+\.png)\)", written.read_text(encoding="utf-8")):
        assert (docs / "benchmarks" / png).is_file(), png


def test_the_reduced_file_regenerates_the_same_report(tmp_path):
    """services.bench.reduced keeps what the report computes from: the same markdown and the same plots, from a
    file a fraction of the records' size."""
    data = reduced.reduce(SAMPLE)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    assert reduced.is_reduced(path) and not reduced.is_reduced(SAMPLE)
    size = sum(p.stat().st_size for p in (SAMPLE / "runs").glob("*/metrics.jsonl"))
    assert path.stat().st_size < size / 3
    for run in data["runs"]:
        original = load_metrics(SAMPLE / "runs" / run["case"]["case_id"] / "metrics.jsonl")
        expanded = reduced.expand(run["records"])
        assert [r["step"] for r in expanded] == [r["step"] for r in original]
        assert [r["wall_s"] for r in expanded if "test_accuracy" in r] == [
            r["wall_s"] for r in original if r.get("test_accuracy") is not None
        ]
    a = write_report(SAMPLE, tmp_path / "a" / "benchmarks.md").read_text()
    b = write_report(path, tmp_path / "b" / "benchmarks.md").read_text()
    drop = ("- Results folder:",)
    lines_a = [line for line in a.splitlines() if not line.startswith(drop)]
    lines_b = [line for line in b.splitlines() if not line.startswith(drop)]
    assert lines_a == lines_b
    assert sorted(p.name for p in (tmp_path / "a" / "benchmarks").iterdir()) == sorted(
        p.name for p in (tmp_path / "b" / "benchmarks").iterdir()
    )


def test_projection_at_another_profile(tmp_path):
    """A timing run at another profile projects each main run's steps to the target onto its step time."""
    results = tmp_path / "results"
    shutil.copytree(SAMPLE, results)
    case_path = results / "runs" / "timing-qsgd-b4" / "case.json"
    case = json.loads(case_path.read_text())
    case.update(profile="edge", bandwidth_mbit=20, latency_ms=10)
    case_path.write_text(json.dumps(case))
    markdown = write_report(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "### `edge` (projected)" in markdown
    timing = records("timing-qsgd-b4")
    step_s = (timing[-1]["wall_s"] - timing[0]["wall_s"]) / (len(timing) - 1)
    main = records("main-qsgd-b4")
    hit = next(r for r in main if (r.get("test_accuracy") or 0) >= 0.4)
    row = table_row(markdown, "### `edge` (projected)", "40.0%")
    assert float(row[1].split()[0]) == pytest.approx((hit["step"] - main[0]["step"]) * step_s, abs=0.006)
    assert "No timing run at `edge` for: dense, svd s=3, svd s=3 paper." in markdown
    assert "accuracy_vs_time_edge_projected.png" in markdown


def test_partial_and_failed_results(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(SAMPLE, results)
    (results / "gradients.json").unlink()
    shutil.rmtree(results / "runs" / "main-qsgd-b4")
    shutil.rmtree(results / "runs" / "timing-qsgd-b4")
    failed = results / "runs" / "main-svd-s3-paper" / "case.json"
    case = json.loads(failed.read_text())
    case.update(state="failed", error="worker-1 exited with status 1")
    failed.write_text(json.dumps(case))
    (results / "runs" / "scale-dense" / "case.json").write_text("{not json")
    markdown = write_report(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "`gradients.json` is missing" in markdown and "No gradient study" in markdown
    assert "`main-svd-s3-paper` (svd s=3 paper, main): state failed" in markdown
    assert "worker-1 exited with status 1" in markdown and "scale-dense" in markdown
    assert table_header(markdown, "### momentum 0.9") == ["test accuracy", "dense", "svd s=3"]
    assert "vs the best QSGD" not in markdown  # no QSGD run left: no row against it


def test_empty_results_folder(tmp_path):
    markdown = write_report(tmp_path / "nothing", tmp_path / "docs" / "benchmarks.md").read_text()
    for note in ("`bench.json` is missing", "No run was found", "No gradient study", "no target to evaluate"):
        assert note in markdown, note


def sample_timings() -> list[scale.RunTiming]:
    out = []
    for folder in sorted((SAMPLE / "runs").iterdir()):
        case = json.loads((folder / "case.json").read_text())
        out.append(scale.run_timing(case, load_metrics(folder / "metrics.jsonl")))
    return out


def test_scale_fit_reproduces_the_sample():
    """Loopback step times on this shared machine move by up to ~40% between identical runs (main-dense and
    momentum_off-dense differ only in momentum), so the tolerance is 35% per run and 20% on average."""
    runs = sample_timings()
    cal = scale.fit(runs)
    errors = [abs(scale.predict_run(r, cal) / r.step_s - 1) for r in runs]
    assert max(errors) < 0.35 and sum(errors) / len(errors) < 0.20, errors
    link = cal.links["loopback"]
    assert link.efficiency_up is None and link.efficiency_down is None and link.overhead_s >= 0
    assert link.rate_up_bps > 0 and link.rate_down_bps > 0
    assert cal.compute_s(2) > cal.compute_s(3) > 0


def test_scale_predictions_are_monotone():
    svd = scale.CodecCost("svd s=3", 0.46e6, 0.136, 0.010)
    dense = scale.CodecCost("dense", 44.7e6, 0.001, 0.009)
    args = dict(compute_s=0.025, update_s=0.03, dense_bytes=44.7e6)
    for cost in (svd, dense):
        by_rate = [scale.predict(cost, 16, gbit * 1.25e8, **args).step_s for gbit in (1, 10, 100)]
        assert by_rate == sorted(by_rate, reverse=True)
        by_workers = [scale.predict(cost, n, 1.25e9, **args).step_s for n in scale.PREDICTION_WORKERS]
        assert by_workers == sorted(by_workers)
        by_shards = [scale.predict(cost, 256, 1.25e9, shards=s, **args).step_s for s in (1, 4, 16)]
        assert by_shards == sorted(by_shards, reverse=True)
    table = scale.speedups({"dense": dense, "svd s=3": svd}, "dense", [8, 256], [1.25e8], **args)
    assert table[1.25e8][8]["dense"] == 1.0 and table[1.25e8][8]["svd s=3"] > 5
    # at 256 workers both send the dense model down, so only the uplink is saved: at most 2x
    assert 1.5 < table[1.25e8][256]["svd s=3"] <= 2.0
    found = scale.ps_bottleneck_workers(svd, 1.25e9, **args)
    assert found is not None and found[1] in ("PS link", "PS CPU")
    with pytest.raises(ValueError, match="workers"):
        scale.predict(svd, 0, 1.25e9, **args)
    with pytest.raises(ValueError, match="no measured run"):
        scale.fit([])


def test_a_failed_regime_run_and_a_null_variance_still_give_a_report(tmp_path):
    """bench.json stores a None ratio for a regime run that failed; gradients.json null variance/stderr."""
    results = tmp_path / "results"
    shutil.copytree(SAMPLE, results)
    bench = json.loads((results / "bench.json").read_text())
    bench.setdefault("regime", {})["dense_comm_share"] = {"loopback": None, "1gbit": 0.5}
    (results / "bench.json").write_text(json.dumps(bench))
    grads = json.loads((results / "gradients.json").read_text())
    codec = next(c for m in grads["models"].values() for c in m["codecs"] if not c.get("error"))
    codec.update(relative_variance=None, stderr=None)
    (results / "gradients.json").write_text(json.dumps(grads))
    markdown = write_report(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "`loopback` -" in markdown and "`1gbit` 50.0%" in markdown


def test_a_hand_edited_reduced_file_is_a_one_line_error(tmp_path, capsys):
    """A key of `lrs_tried` without its " momentum <m>", and a run whose records are not a list: exit 2 with a
    one-line reason, no traceback, and no report written."""
    from services.bench.cli import report_from

    data = json.loads((ROOT / "docs" / "benchmarks" / "bench.json").read_text())
    label = next(iter(data["lrs_tried"]))
    for edit in (
        lambda d: d["lrs_tried"].update({label.split(" momentum ")[0]: [0.1]}),
        lambda d: d["runs"][0].update(records="not a list"),
    ):
        edited = json.loads(json.dumps(data))
        edit(edited)
        path = tmp_path / "bench.json"
        path.write_text(json.dumps(edited))
        report = tmp_path / "report.md"
        assert report_from(path, report) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not in the form the report reads" in err and "Traceback" not in err
        assert not report.exists()
