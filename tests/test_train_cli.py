"""`atomo train` end to end: a real PS and real worker processes on loopback, run as the user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services import report
from services.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = report.PLOT_FILES
# Small and quick: LeNet-5 on the offline digits data, 2 workers, a handful of steps.
QUICK = ["--steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--batch-size", "32"]


def atomo_train(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "services", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def only_child(folder: Path) -> Path:
    children = [p for p in folder.iterdir() if p.is_dir()]
    assert len(children) == 1, children
    return children[0]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1000, path


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--budget", "-1"], "codec.budget (--budget)"),
        (["--codec", "qsgd", "--budget", "3"], "codec.budget"),
        (["--steps", "1.5"], "steps (--steps)"),
        (["--batch-size", "2", "--workers", "4"], "batch_size (--batch-size)"),
        (["--compare", "svd:budget=3", "qsgd:levels=4"], "--compare qsgd:levels=4: levels"),
        (["--compare", "svd:budget=3", "svd: budget=3"], "--compare: the same codec is given twice"),
        (["--compare", "svd", "dense", "--budget", "2"], "give each codec's parameters in its entry"),
        (["--compare", "entrywise", "--vector-codec", "entrywise"], "--compare: give each codec's parameters"),
    ],
)
def test_invalid_flags_exit_2_naming_the_field(tmp_path, capsys, args, field):
    assert main(["train", *args, "--out", str(tmp_path / "runs")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_invalid_spec_file_exits_2_naming_the_field(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: lenet5\nworkrs: 2\ncodec:\n  name: svd\n  budget: 0\n")
    assert main(["train", str(spec), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "workrs: Extra inputs are not permitted" in err
    assert "codec.budget (--budget): Input should be greater than 0" in err
    spec.write_text("- a list\n")
    assert main(["train", str(spec)]) == 2
    assert "must hold a mapping of RunSpec fields" in capsys.readouterr().err


@pytest.mark.slow
def test_yaml_spec_with_flags_over_it_writes_the_results_folder(tmp_path):
    (tmp_path / "spec.yaml").write_text(
        "model: lenet5\ndataset: digits\nworkers: 2\nsteps: 40\nseed: 7\ncodec:\n  name: svd\n  budget: 2\n"
    )
    result = atomo_train("spec.yaml", *QUICK, "--budget", "3", "--out", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = only_child(tmp_path / "runs")
    spec = json.loads((folder / "spec.json").read_text())
    assert (spec["steps"], spec["seed"], spec["codec"]["budget"]) == (6, 7, 3)  # flags override, file stays
    records = metrics(folder)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert sum(1 for r in records if r.get("test_accuracy") is not None) >= 2
    csv_lines = (folder / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(records)
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint
    for name in PLOTS:
        assert_png(folder / name)
    assert "step 6/6" in result.stdout
    assert "final test acc" in result.stdout
    assert f"results: {Path('runs') / folder.name}" in result.stdout


@pytest.mark.slow
def test_compare_runs_each_codec_and_prints_them_side_by_side(tmp_path):
    result = atomo_train("--compare", "svd:budget=2", "dense", *QUICK, "--out", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    header = next(line for line in result.stdout.splitlines() if "svd:budget=2" in line and "dense" in line)
    assert header.split() == ["svd:budget=2", "dense"]
    ratio = next(line for line in result.stdout.splitlines() if line.startswith("compression ratio"))
    svd_ratio, dense_ratio = (float(cell.rstrip("x")) for cell in ratio.split()[-2:])
    assert svd_ratio > 1.5 and dense_ratio == pytest.approx(1.0, abs=0.05)
    folder = only_child(tmp_path / "runs")
    comparison = json.loads((folder / "comparison.json").read_text())
    assert list(comparison) == ["svd:budget=2", "dense"]
    for sub in ("svd-budget-2", "dense"):
        assert [r["step"] for r in metrics(folder / sub)] == [1, 2, 3, 4, 5, 6]
        assert json.loads((folder / sub / "spec.json").read_text())["seed"] == 0
    for name in PLOTS:
        assert_png(folder / name)


@pytest.mark.slow
def test_a_failing_process_is_reported_with_its_log(tmp_path):
    # A global batch larger than the digits training set: valid as a spec, but the PS fails the run.
    result = atomo_train("--batch-size", "4096", "--steps", "2", "--out", "runs", cwd=tmp_path)
    assert result.returncode not in (0, 2), result.stdout + result.stderr
    assert "does not fit digits" in result.stderr and "--- the end of" in result.stderr  # the PS's log is quoted
    folder = only_child(tmp_path / "runs")
    assert list((folder / "logs").glob("*.log"))


def test_a_diverging_run_fails_with_a_clear_error(tmp_path):
    # lr 10 makes the MLP's loss overflow within a few steps: the worker reports it, the PS fails the run.
    result = atomo_train("--model", "mlp", "--lr", "10", "--steps", "60", "--out", "runs", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training diverged at step" in result.stdout + result.stderr
    events = (only_child(tmp_path / "runs") / "events.jsonl").read_text()
    assert '"state": "failed"' in events and "diverged" in events


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_a_cuda_run_without_cuda_fails_with_a_clear_error(tmp_path):
    result = atomo_train("--device", "cuda", "--steps", "2", "--out", "runs", cwd=tmp_path)
    assert result.returncode not in (0, 2), result.stdout + result.stderr
    assert "CUDA is not available" in result.stdout + result.stderr


def children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is `pid` (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def start_long_training(cwd: Path, *args: str) -> subprocess.Popen:
    """`atomo train` of 5000 steps in its own process group, returned once its first progress line is out."""
    process = subprocess.Popen(
        [sys.executable, "-m", "services", "train", "--steps", "5000", *args, "--out", "runs"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:  # the first progress line comes with the first steps' metrics
        if re.search(r"step \d+/5000", line):
            break
    return process


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_keeps_the_results(tmp_path):
    process = start_long_training(tmp_path, "--eval-every", "2")
    try:
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # no PS or worker left behind
    folder = only_child(tmp_path / "runs")
    steps = len(metrics(folder))
    assert steps >= 1
    assert re.search(rf"^steps\s+{steps}$", stdout, re.MULTILINE)  # the summary of what was done
    assert (folder / "checkpoint.pt").stat().st_size > 0
    for name in PLOTS:
        assert_png(folder / name)
