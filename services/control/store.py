"""The control service's durable state: runs, their per-step metrics and their events, in SQLite (WAL mode).

Each thread gets its own connection (the API serves requests from a threadpool, the scheduler writes from its
own thread); WAL lets them overlap.
Runs are served in FIFO order of `seq`; a run's state only moves forward (see `FINAL`).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

STATES = ("queued", "starting", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("starting", "running")
FINAL = ("succeeded", "failed", "cancelled")

# The progress the PS reports for a run (docs/architecture.md, `run`), stored as the run's latest values.
PROGRESS_FIELDS = (
    "step",
    "total_steps",
    "loss",
    "test_accuracy",
    "bytes_up",
    "bytes_down",
    "compression_ratio",
    "mean_encode_s",
    "mean_compute_s",
    "mean_communication_s",
    "workers_training",
    "workers_at_start",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    ps_event_seq INTEGER NOT NULL DEFAULT -1
);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state, seq);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, seq);
"""


def new_run_id() -> str:
    """A short unique id, safe as a directory name at the PS."""
    return "run-" + uuid.uuid4().hex[:12]


class Store:
    """Runs, metrics and events in one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Moves on after every committed write: a read made at version v is current while version == v.
        self._versions = itertools.count(1)
        self.version = 0
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def ping(self) -> bool:
        try:
            return self._conn().execute("SELECT 1").fetchone()[0] == 1
        except sqlite3.Error:
            return False

    @contextmanager
    def _writing(self):
        """A write transaction; `version` moves on once it has committed."""
        conn = self._conn()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
        self.version = next(self._versions)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # Runs ---------------------------------------------------------------------------------------------

    def create_run(self, spec: dict, reason: str = "submitted") -> dict:
        run_id, now = new_run_id(), time.time()
        with self._writing() as conn:
            conn.execute(
                "INSERT INTO runs (id, state, reason, spec, created_at) VALUES (?, 'queued', ?, ?, ?)",
                (run_id, reason, json.dumps(spec), now),
            )
            self._event(conn, run_id, now, "state", {"state": "queued", "reason": reason})
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else _run(row)

    def list_runs(self, states: list[str] | None = None, before_seq: int | None = None, limit: int = 50) -> list:
        """Newest first; `before_seq` continues a listing after its last run."""
        sql, args = "SELECT * FROM runs WHERE 1 = 1", []
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += list(states)
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        return [_run(row) for row in self._conn().execute(sql, args)]

    def next_queued(self) -> dict | None:
        row = self._conn().execute("SELECT * FROM runs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else _run(row)

    def active_runs(self) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM runs WHERE state IN ('starting', 'running') ORDER BY seq")
        return [_run(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, n in self._conn().execute("SELECT state, COUNT(*) FROM runs GROUP BY state"):
            counts[state] = n
        return counts

    def transition(self, run_id: str, state: str, reason: str, *, from_states=None, error: str | None = None) -> bool:
        """Move a run to `state` (only from `from_states`, default: any non-final state); record the event."""
        from_states = tuple(from_states or (s for s in STATES if s not in FINAL))
        now = time.time()
        sets = "state = ?, reason = ?"
        args: list = [state, reason]
        if state in ACTIVE:
            sets += ", started_at = COALESCE(started_at, ?)"
            args.append(now)
        if state in FINAL:
            sets += ", finished_at = ?, error = COALESCE(?, error)"
            args += [now, error]
        with self._writing() as conn:
            cur = conn.execute(
                f"UPDATE runs SET {sets} WHERE id = ? AND state IN ({', '.join('?' * len(from_states))})",
                [*args, run_id, *from_states],
            )
            if cur.rowcount:
                detail = {"state": state, "reason": reason} | ({"error": error} if error else {})
                self._event(conn, run_id, now, "state", detail)
        return bool(cur.rowcount)

    def request_cancel(self, run_id: str) -> None:
        with self._writing() as conn:
            conn.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))

    def set_progress(self, run_id: str, progress: dict) -> None:
        """Merge the PS's latest figures for a run into what the store has."""
        kept = {k: progress[k] for k in PROGRESS_FIELDS if progress.get(k) is not None}
        with self._writing() as conn:
            conn.execute("UPDATE runs SET progress = json_patch(progress, ?) WHERE id = ?", (json.dumps(kept), run_id))

    def progress_from_metrics(self, run_id: str) -> dict:
        """A run's figures rebuilt from its stored per-step records (when the PS no longer reports it live)."""
        totals = """SELECT MAX(step), SUM(json_extract(record, '$.bytes_up')),
                           SUM(json_extract(record, '$.bytes_down')), SUM(json_extract(record, '$.dense_bytes')),
                           AVG(json_extract(record, '$.encode_s')),
                           AVG(json_extract(record, '$.compute_s')), AVG(json_extract(record, '$.communication_s'))
                    FROM metrics WHERE run_id = ?"""
        row = self._conn().execute(totals, (run_id,)).fetchone()
        if row[0] is None:
            return {}
        step, up, down, dense, enc, comp, comm = row
        last = self.metrics_at(run_id, step)
        latest_accuracy = """SELECT json_extract(record, '$.test_accuracy') FROM metrics WHERE run_id = ?
                             AND json_extract(record, '$.test_accuracy') IS NOT NULL ORDER BY step DESC LIMIT 1"""
        evaluated = self._conn().execute(latest_accuracy, (run_id,)).fetchone()
        return {
            "step": step,
            "loss": last.get("loss"),
            "test_accuracy": None if evaluated is None else evaluated[0],
            "bytes_up": up,
            "bytes_down": down,
            "compression_ratio": dense / up if dense and up else None,
            "mean_encode_s": enc,
            "mean_compute_s": comp,
            "mean_communication_s": comm,
        }

    def metrics_at(self, run_id: str, step: int) -> dict:
        sql = "SELECT record FROM metrics WHERE run_id = ? AND step = ?"
        row = self._conn().execute(sql, (run_id, step)).fetchone()
        return {} if row is None else json.loads(row[0])

    # Metrics and events ---------------------------------------------------------------------------------

    def last_step(self, run_id: str) -> int:
        row = self._conn().execute("SELECT MAX(step) FROM metrics WHERE run_id = ?", (run_id,)).fetchone()
        return -1 if row[0] is None else row[0]

    def add_metrics(self, run_id: str, records: list[dict]) -> None:
        rows = [(run_id, int(r["step"]), json.dumps(r, separators=(",", ":"))) for r in records]
        with self._writing() as conn:
            conn.executemany("INSERT OR IGNORE INTO metrics (run_id, step, record) VALUES (?, ?, ?)", rows)

    def metrics(self, run_id: str, since: int, limit: int) -> list[dict]:
        rows = self._conn().execute(
            "SELECT record FROM metrics WHERE run_id = ? AND step > ? ORDER BY step LIMIT ?", (run_id, since, limit)
        )
        return [json.loads(r[0]) for r in rows]

    def metrics_text(self, run_id: str, since: int, limit: int) -> tuple[list[str], int | None]:
        """`metrics` as the stored JSON texts, undecoded, and the last one's step (None: no record)."""
        rows = (
            self._conn()
            .execute(
                "SELECT step, record FROM metrics WHERE run_id = ? AND step > ? ORDER BY step LIMIT ?",
                (run_id, since, limit),
            )
            .fetchall()
        )
        return [r[1] for r in rows], (rows[-1][0] if rows else None)

    def add_ps_events(self, run_id: str, events: list[dict]) -> None:
        """Copy the PS's events (worker joins and losses, ...) and remember the last PS sequence number."""
        if not events:
            return
        with self._writing() as conn:
            for e in events:
                self._event(conn, run_id, float(e.get("time", time.time())), str(e["type"]), e.get("detail") or {})
            last = max(int(e["seq"]) for e in events)
            conn.execute("UPDATE runs SET ps_event_seq = MAX(ps_event_seq, ?) WHERE id = ?", (last, run_id))

    def add_event(self, run_id: str, type_: str, detail: dict) -> None:
        with self._writing() as conn:
            self._event(conn, run_id, time.time(), type_, detail)

    def events(self, run_id: str, since: int, limit: int) -> list[dict]:
        """The first `limit` events after sequence number `since`, ordered by time (then seq): the PS's events are
        copied in after the service's own (ps_exited, ps_restarted), so seq alone is not the order they happened."""
        rows = self._conn().execute(
            "SELECT * FROM (SELECT seq, time, type, detail FROM events WHERE run_id = ? AND seq > ? ORDER BY seq "
            "LIMIT ?) ORDER BY time, seq",
            (run_id, since, limit),
        )
        return [{"seq": r[0], "time": r[1], "type": r[2], "detail": json.loads(r[3])} for r in rows]

    @staticmethod
    def _event(conn: sqlite3.Connection, run_id: str, t: float, type_: str, detail: dict) -> None:
        conn.execute(
            "INSERT INTO events (run_id, time, type, detail) VALUES (?, ?, ?, ?)",
            (run_id, t, type_, json.dumps(detail)),
        )


def _run(row: sqlite3.Row) -> dict:
    run = dict(row)
    run["spec"] = json.loads(run["spec"])
    run["progress"] = json.loads(run["progress"])
    run["cancel_requested"] = bool(run["cancel_requested"])
    return run
