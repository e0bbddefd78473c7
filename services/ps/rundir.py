"""A run's directory, `<state-dir>/runs/<run_id>/` (docs/architecture.md, "Run directory").

spec.json, metrics.jsonl (one record per step), events.jsonl, checkpoint.pt, summary.json (when the run ends).
A run with a spec.json and no summary.json is unfinished: a restarted PS resumes it from its checkpoint.

Every file that is replaced rather than appended to (spec.json, checkpoint.pt, summary.json, and
metrics.jsonl when a resumed run drops the steps after its checkpoint) is written to a temporary file beside
it, fsynced and renamed over it: a crash at any moment leaves the old file or the new one, and a failed
write (a full disk) removes its temporary file and leaves the old one as it was. The run directories are
private to the PS's user (folders 0700, files 0600): checkpoints hold the model.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from services.common.files import FILE_MODE, open_private, private_dir

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


def _replace_atomically(path: Path, write: Callable) -> None:
    """Write `path` through `write(file)` into a temporary file, fsync it, rename it over `path` and fsync
    the folder. On any failure (ENOSPC) the temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open_private(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    _replace_atomically(path, lambda f: f.write(data))


def _jsonl_lines(path: Path) -> Iterator[tuple[bytes, dict]]:
    """Each line of a JSON-lines file with its object, one at a time; a line cut short by a crash ends it."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                return
            yield line if line.endswith(b"\n") else line + b"\n", obj


def _read_jsonl(path: Path) -> list[dict]:
    return [obj for _, obj in _jsonl_lines(path)]


class RunDirectory:
    def __init__(self, state_dir: Path, run_id: str):
        self.run_id = check_run_id(run_id)
        self.path = Path(state_dir) / "runs" / run_id

    def create(self, spec: dict) -> None:
        private_dir(self.path.parent)
        private_dir(self.path)
        _write_atomically(self.path / "spec.json", json.dumps(spec, indent=2).encode())

    def spec(self) -> dict:
        return json.loads((self.path / "spec.json").read_text())

    def append_metrics(self, records: list[dict]) -> None:
        self._append("metrics.jsonl", records)

    def append_event(self, event: dict) -> None:
        self._append("events.jsonl", [event])

    def _append(self, name: str, objects: list[dict]) -> None:
        if objects:
            with open_private(self.path / name, "a") as f:
                f.write("".join(json.dumps(o, allow_nan=False) + "\n" for o in objects))

    def claim(self) -> None:
        """Called by the run that starts or resumes here: the folders made 0700 and the files 0600 (a run
        directory written before that rule), and the temporary files of a PS killed while writing removed."""
        private_dir(self.path.parent)
        private_dir(self.path)
        for path in self.path.iterdir():
            if not path.is_file() or path.is_symlink():
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink()
            else:
                os.chmod(path, FILE_MODE)

    def metrics(self) -> Iterator[dict]:
        """The per-step records, read one at a time (a long run's history is never held whole)."""
        return (record for _, record in _jsonl_lines(self.path / "metrics.jsonl"))

    def rewind_metrics(self, step: int, each: Callable[[dict], None]) -> None:
        """Keep only the records of steps up to `step` (a run resumed from its checkpoint at `step` redoes the
        later ones), streaming them from metrics.jsonl into its replacement (see the module's doc), and
        call `each` with every record kept."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return

        def write(f) -> None:
            for line, record in _jsonl_lines(path):
                if record["step"] <= step:
                    f.write(line)
                    each(record)

        _replace_atomically(path, write)

    def events(self) -> list[dict]:
        return _read_jsonl(self.path / "events.jsonl")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        _replace_atomically(self.checkpoint_path, lambda f: torch.save(state, f))

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
