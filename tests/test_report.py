"""services.report on the metrics of a real short run (a real PS and workers, started by `atomo train`), and
the spec that run recorded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from matplotlib.image import imread
from pydantic import ValidationError

from services import report
from services.common.spec import CodecSpec, RunSpec

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("report")
    args = ["--steps", str(STEPS), "--eval-every", "2", "--batch-size", "32", "--lr", "0.1", "--out", "runs"]
    result = subprocess.run(
        [sys.executable, "-m", "services", "train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (folder,) = (cwd / "runs").iterdir()
    return folder


@pytest.fixture(scope="module")
def records(run_folder):
    return report.load_metrics(run_folder / "metrics.jsonl")


def test_summary_totals_agree_with_the_records_and_the_ps_summary(run_folder, records):
    summary = report.summarize(records)
    assert summary["steps"] == STEPS == len(records)
    assert summary["time_s"] == records[-1]["wall_s"] - records[0]["wall_s"] > 0
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in records) > 0
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in records) > 0
    # The default codec (svd, budget 3) sends far less than dense fp32 would.
    assert summary["bytes_total"] == summary["bytes_up"] + summary["bytes_down"]
    assert summary["compression_ratio"] == pytest.approx(summary["dense_bytes_up"] / summary["bytes_up"])
    assert summary["compression_ratio"] > 2
    evals = [r for r in records if r.get("test_accuracy") is not None]
    assert summary["final_test_accuracy"] == evals[-1]["test_accuracy"]
    assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in evals)
    for key in ("compute_s", "encode_s", "communication_s"):
        measured = [r[key] for r in records if r[key] is not None]  # step 1 has no communication time
        assert len(measured) >= STEPS - 1
        assert summary[f"mean_{key}"] == pytest.approx(sum(measured) / len(measured))
        assert summary[f"mean_{key}"] >= 0
    assert summary["mean_compute_s"] > 0
    # The PS keeps its own totals while the run goes on: they must agree with the sums over the records.
    ps_summary = json.loads((run_folder / "summary.json").read_text())
    assert ps_summary["state"] == "succeeded"
    for key, ps_key in (("bytes_up", "bytes_up"), ("bytes_down", "bytes_down"), ("dense_bytes_up", "dense_bytes")):
        assert summary[key] == ps_summary[ps_key]
    for key in ("compression_ratio", "mean_compute_s", "mean_encode_s", "mean_communication_s"):
        assert summary[key] == pytest.approx(ps_summary[key], rel=1e-9)
    assert summary["final_test_accuracy"] == ps_summary["test_accuracy"]


def test_time_to_target_is_the_first_evaluation_at_or_above_it(records):
    evals = [r for r in records if r.get("test_accuracy") is not None]
    target = max(r["test_accuracy"] for r in evals)
    first = next(r for r in evals if r["test_accuracy"] >= target)
    summary = report.summarize(records, target)
    time_to_target = first["wall_s"] - records[0]["wall_s"]  # counted from the end of step 1
    assert (summary["step_to_target"], summary["time_to_target_s"]) == (first["step"], time_to_target)
    through = [r for r in records if r["step"] <= first["step"]]
    assert summary["bytes_up_to_target"] == sum(r["bytes_up"] for r in through)
    assert summary["bytes_down_to_target"] == sum(r["bytes_down"] for r in through)
    assert summary["bytes_total_to_target"] == summary["bytes_up_to_target"] + summary["bytes_down_to_target"]
    unreachable = report.summarize(records, 1.01)
    assert unreachable["time_to_target_s"] is None and unreachable["bytes_total_to_target"] is None


def test_the_default_target_is_a_fraction_of_the_best_final_accuracy(records):
    early = [r for r in records if r["step"] <= STEPS // 2]
    summaries = report.summarize_runs({"all": records, "first half": early})
    best_final = max(report.summarize(rs)["final_test_accuracy"] for rs in (records, early))
    assert summaries["all"]["target_accuracy"] == pytest.approx(report.RELATIVE_TARGET * best_final)
    assert summaries["first half"]["target_accuracy"] == summaries["all"]["target_accuracy"]
    assert summaries["all"]["steps"] == STEPS and summaries["first half"]["steps"] == STEPS // 2


def test_plots_are_nonblank_pngs(tmp_path, records):
    paths = report.plot({"svd": records, "svd, first half": records[: STEPS // 2]}, tmp_path)
    assert [p.name for p in paths] == list(report.PLOT_FILES)
    assert "training_loss.png" in report.PLOT_FILES
    for path in paths:
        image = imread(path)
        assert image.ndim == 3 and 300 <= image.shape[0] <= 1000 and 400 <= image.shape[1] <= 1500
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_a_run_without_records_still_plots(tmp_path):
    for path in report.plot({"svd": []}, tmp_path):
        assert imread(path).shape[0] >= 300


def test_curves_of_a_long_run_stay_bounded_and_keep_the_ends(records):
    long_run = [r | {"step": i + 1} for i, r in enumerate(records * 25)]  # 25 x STEPS steps, evaluated throughout
    curves = report.curves(long_run, max_points=16)
    assert 8 <= len(curves.loss) <= 17 and 8 <= len(curves.test_accuracy) <= 17
    assert (
        curves.loss_step[0] == 1 and curves.loss_step[-1] == len(long_run) and curves.loss[-1] == long_run[-1]["loss"]
    )
    assert curves.loss_step == sorted(curves.loss_step)
    full = report.curves(records)
    assert full.loss_step == [r["step"] for r in records]  # a short run is drawn at every step
    sent = sum(r["bytes_up"] + r["bytes_down"] for r in records)
    assert full.eval_mb_total[-1] == pytest.approx(sent / 1e6)


def test_train_wrote_the_plots_csv_and_report(run_folder, records):
    for name in report.PLOT_FILES:
        assert imread(run_folder / name).shape[0] >= 300
    with open(run_folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [r["step"] for r in records]
    assert [float(row["loss"]) for row in rows] == pytest.approx([r["loss"] for r in records])
    saved = json.loads((run_folder / "report.json").read_text())
    expected = report.summarize_runs({"svd": records})["svd"]
    assert saved == pytest.approx(expected)


def test_the_table_shows_each_run_in_its_column(records):
    summaries = report.summarize_runs({"svd": records, "svd, first half": records[: STEPS // 2]})
    lines = report.format_table(summaries).splitlines()
    assert lines[0].split("  ")[-1].strip() == "svd, first half"
    row = {line.split("  ")[0].strip(): line.split()[-2:] for line in lines[2:]}
    assert row["steps"] == [str(STEPS), str(STEPS // 2)]
    assert row["final test acc"][0] == f"{summaries['svd']['final_test_accuracy']:.4f}"
    # Every byte figure says its direction: up, down, or the total of both.
    mb = {title: value[0] for title, value in row.items() if title.startswith("MB")}
    target = f"{summaries['svd']['target_accuracy']:.3f}"
    assert mb == {
        "MB up (workers->PS)": f"{summaries['svd']['bytes_up'] / 1e6:.2f}",
        "MB down (PS->workers)": f"{summaries['svd']['bytes_down'] / 1e6:.2f}",
        "MB total (up + down)": f"{summaries['svd']['bytes_total'] / 1e6:.2f}",
        f"MB up to acc {target}": f"{summaries['svd']['bytes_up_to_target'] / 1e6:.2f}",
        f"MB total to acc {target}": f"{summaries['svd']['bytes_total_to_target'] / 1e6:.2f}",
    }


def test_a_torn_last_line_is_skipped(tmp_path, run_folder, records):
    text = (run_folder / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(text + text.splitlines()[-1][:20])
    assert report.load_metrics(tmp_path / "metrics.jsonl") == records


# A recorded spec is the spec that ran: null only where null is itself the setting.
NULL_MEANS = {"codec.clip": "no clipping", "num_aggregate": "all live workers", "epochs": "counted in steps"}


def _takes(codec: str, parameter: str) -> bool:
    """Whether `codec` has the parameter at all (validation refuses another codec's parameter)."""
    try:
        CodecSpec.model_validate({"name": codec, parameter: 1})
    except ValidationError:
        return False
    return True


def unresolved(spec: dict) -> list[str]:
    """The fields of a recorded spec left null although they have a default (should be none)."""
    RunSpec.model_validate(spec)  # a recorded spec is a valid spec
    nulls = [key for key, value in spec.items() if value is None]
    nulls += [
        f"codec.{key}" for key, value in spec["codec"].items() if value is None and _takes(spec["codec"]["name"], key)
    ]
    return [key for key in nulls if key not in NULL_MEANS]


def test_the_recorded_spec_holds_every_default(run_folder):
    recorded = json.loads((run_folder / "spec.json").read_text())
    assert unresolved(recorded) == []
    assert recorded["steps"] == STEPS and recorded["codec"]["budget"] == 3
    assert json.loads((run_folder / "summary.json").read_text())["spec"] == recorded
    defaults = {
        name: RunSpec.model_validate({"codec": {"name": name}}).model_dump(mode="json") for name in ("qsgd", "lq")
    }
    assert [unresolved(spec) for spec in defaults.values()] == [[], []]
    assert (defaults["qsgd"]["codec"]["bits"], defaults["qsgd"]["codec"]["bucket_size"]) == (4, 512)
    assert defaults["lq"]["codec"]["q"] == "inf" and defaults["qsgd"]["steps"] == 300
