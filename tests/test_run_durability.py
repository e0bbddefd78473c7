"""A run's directory survives the PS: a real PS process resumes a run of 60,000 recorded steps from its
checkpoint at step 50,000, SIGKILLed while it rewrites metrics.jsonl, and on a full disk (a real tmpfs,
where the run fails with the reason); every record up to the checkpoint is kept, no temporary file is left,
and the files are private."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from helpers import wait_until

from services.common.launch import LocalCluster
from services.common.replica import Replica
from services.common.spec import RunSpec
from services.ps.rundir import RunDirectory

RECORDS = 60_000
CHECKPOINT_STEP = 50_000
RUN_ID = "long-run"
SPEC = RunSpec(model="mlp", workers=2, batch_size=32, steps=100_000, eval_every=1000, checkpoint_every=1000)


def record(step: int) -> dict:
    return {
        "step": step,
        "time": 1.7e9 + step,
        "wall_s": 0.1 * step,
        "loss": 1.0 / step,
        "lr": 0.05,
        "k": 2,
        "workers": 2,
        "bytes_up": 1000,
        "bytes_down": 2000,
        "dense_bytes": 8000,
        "encode_s": 0.001,
        "compute_s": 0.002,
        "communication_s": 0.003,
        "step_s": 0.01,
    } | ({"test_accuracy": step / RECORDS} if step % 1000 == 0 else {})


def write_long_run(state_dir: Path) -> Path:
    """A run as a PS leaves it when killed at step 60,000: its records, and its checkpoint of step 50,000."""
    rundir = RunDirectory(state_dir, RUN_ID)
    rundir.create(SPEC.model_dump(mode="json"))
    torch.manual_seed(0)
    replica = Replica(SPEC, 10, 1, torch.device("cpu"))
    rundir.save_checkpoint(
        {
            "run_id": RUN_ID,
            "step": CHECKPOINT_STEP,
            "model": replica.model.state_dict(),
            "optimizer": replica.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "totals": {"bytes_up": 0, "bytes_down": 0, "dense_bytes": 0},
            "wall_s": 5000.0,
            "started_at": 1.7e9,
        }
    )
    with open(rundir.path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(record(s)) + "\n" for s in range(1, RECORDS + 1))
    os.chmod(rundir.path / "metrics.jsonl", 0o644)  # as a PS before the files were made private left it
    return rundir.path


def steps_in(path: Path) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def run_events(cluster: LocalCluster) -> list[dict]:
    return cluster.client().call("events", run_id=RUN_ID, since=0)["events"]


def resumed(cluster: LocalCluster) -> bool:
    return any(e["type"] == "resumed" for e in run_events(cluster))


@pytest.fixture
def logs(tmp_path) -> Path:
    return tmp_path / "logs"


def test_a_ps_killed_while_it_rewrites_the_records_on_resume_loses_none(tmp_path, logs):
    folder = write_long_run(tmp_path / "state")
    metrics = folder / "metrics.jsonl"
    original = metrics.stat()
    cluster = LocalCluster(tmp_path / "state", workers=0, log_dir=logs, threads=1, metrics=False)
    try:
        cluster.start_ps()  # resumes the run: the rewrite happens while the run prepares

        def rewriting() -> bool:  # the rewrite has begun (a temporary file) or the records file changed
            try:
                now = metrics.stat()
            except FileNotFoundError:
                return True
            return (folder / ".metrics.jsonl.tmp").exists() or (now.st_ino, now.st_size) != (
                original.st_ino,
                original.st_size,
            )

        wait_until(rewriting, 60, "the rewrite of metrics.jsonl", interval_s=0.001)
        cluster.kill(cluster.ps, signal.SIGKILL)
        kept = steps_in(metrics)
        assert kept[:CHECKPOINT_STEP] == list(range(1, CHECKPOINT_STEP + 1)), "records lost by the killed PS"

        cluster.start_ps()  # the next PS resumes it in full
        wait_until(lambda: resumed(cluster), 60, "the resume")
        assert steps_in(metrics) == list(range(1, CHECKPOINT_STEP + 1))
        assert not list(folder.glob(".*.tmp")), "a temporary file was left behind"
        # The records are served from the file, in pages, and the run's figures count every kept record.
        page = cluster.client().call("metrics", run_id=RUN_ID, since=0)["records"]
        assert [r["step"] for r in page] == list(range(1, 10_001))
        run = cluster.client().status()["run"]
        assert run["step"] == CHECKPOINT_STEP and run["test_accuracy"] == CHECKPOINT_STEP / RECORDS
        assert run["mean_encode_s"] == pytest.approx(0.001)
    finally:
        cluster.stop()
    for path in [folder, folder.parent, logs]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in [*folder.iterdir(), *logs.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB tmpfs (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill `disk` with one file, then free `leave_bytes` of it again."""
    filler = disk / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave_bytes))
    return filler


def test_on_a_full_disk_the_resume_fails_the_run_and_keeps_every_record(tmp_path, small_disk, logs):
    folder = write_long_run(small_disk / "state")
    metrics = folder / "metrics.jsonl"
    filler = fill(small_disk, 256 << 10)  # room for the events, not for the rewritten records
    cluster = LocalCluster(small_disk / "state", workers=0, log_dir=logs, threads=1, metrics=False)
    try:
        cluster.start_ps()
        run = wait_until(
            lambda: (r := cluster.client().status()["run"]) and r["state"] == "failed" and r,
            60,
            "the run to fail",
        )
        assert "No space left on device" in run["error"] and "prepare" in run["error"]
        assert steps_in(metrics) == list(range(1, RECORDS + 1)), "records lost on a full disk"
        assert not list(folder.glob(".*.tmp")), "a partial temporary file was left on the full disk"
        filler.unlink()
        page = cluster.client().call("metrics", run_id=RUN_ID, since=CHECKPOINT_STEP)["records"]
        assert [r["step"] for r in page] == list(range(CHECKPOINT_STEP + 1, RECORDS + 1))
    finally:
        cluster.stop()
