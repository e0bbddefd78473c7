"""A run's directory, `<state-dir>/runs/<run_id>/` (docs/architecture.md, "Run directory").

spec.json, metrics.jsonl (one record per step), events.jsonl, checkpoint.pt (written to a temporary file,
then renamed), summary.json (when the run ends). A run with a spec.json and no summary.json is unfinished:
a restarted PS resumes it from its checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import torch

RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def check_run_id(run_id) -> str:
    """A run id names a folder and rides in message headers: 1-64 characters of [A-Za-z0-9_.-]."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        raise ValueError(f"run id must be 1-64 characters of [A-Za-z0-9_.-], got {run_id!r}")
    return run_id


def new_run_id(name: str) -> str:
    """The spec's name (made safe) and the UTC time, e.g. atomo-run-20260101-120000."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a line cut short by a crash ends the file
    return out


class RunDirectory:
    def __init__(self, state_dir: Path, run_id: str):
        self.run_id = check_run_id(run_id)
        self.path = Path(state_dir) / "runs" / run_id

    def create(self, spec: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path / "spec.json", json.dumps(spec, indent=2).encode())

    def spec(self) -> dict:
        return json.loads((self.path / "spec.json").read_text())

    def append_metrics(self, records: list[dict]) -> None:
        self._append("metrics.jsonl", records)

    def append_event(self, event: dict) -> None:
        self._append("events.jsonl", [event])

    def _append(self, name: str, objects: list[dict]) -> None:
        if objects:
            with open(self.path / name, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(o, allow_nan=False) + "\n" for o in objects))

    def metrics(self) -> list[dict]:
        return _read_jsonl(self.path / "metrics.jsonl")

    def events(self) -> list[dict]:
        return _read_jsonl(self.path / "events.jsonl")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_atomically(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    def write_summary(self, summary: dict) -> None:
        _write_atomically(self.path / "summary.json", json.dumps(summary, indent=2, allow_nan=False).encode())

    def summary(self) -> dict | None:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None


def scan_runs(state_dir: Path) -> tuple[dict[str, dict], list[str]]:
    """Past runs' summaries by id, and the ids of unfinished runs (oldest first)."""
    root = Path(state_dir) / "runs"
    finished: dict[str, dict] = {}
    unfinished: list[tuple[float, str]] = []
    if not root.is_dir():
        return finished, []
    for path in root.iterdir():
        if not (path / "spec.json").exists() or not RUN_ID.fullmatch(path.name):
            continue
        run = RunDirectory(state_dir, path.name)
        try:
            summary = run.summary()
            if summary is not None and not isinstance(summary, dict):
                raise ValueError(f"a JSON {type(summary).__name__}, not an object")
        except (OSError, ValueError) as exc:  # a run with a summary is over, whatever its summary says
            summary = {"run_id": path.name, "state": "failed", "error": f"summary.json unreadable: {exc}"[:500]}
        if summary is not None:
            finished[path.name] = summary
        else:
            unfinished.append(((path / "spec.json").stat().st_mtime, path.name))
    return finished, [name for _, name in sorted(unfinished)]
