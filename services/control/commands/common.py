"""What the client commands share: --url/--token, the client, and one way to report errors."""

from __future__ import annotations

import argparse
import functools
import math
import sys
from datetime import datetime

import httpx

from services.control.client import DEFAULT_URL, TOKEN_ENV, URL_ENV, ApiError, Client, resolve_url

FINAL = ("succeeded", "failed", "cancelled")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"control service URL (default: ${URL_ENV} or {DEFAULT_URL})")
    parser.add_argument("--token", help=f"API token (default: ${TOKEN_ENV})")


def client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token)


def reports_errors(command: str):
    """Turn API and connection errors into a one-line message on stderr and a non-zero exit code."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except ApiError as exc:
                print(f"atomo {command}: {exc.message} ({exc.status} {exc.code})", file=sys.stderr)
                for d in exc.details if isinstance(exc.details, list) else []:
                    print(f"  {d.get('field', '?')}: {d.get('message', '')}", file=sys.stderr)
                return 1
            except httpx.HTTPError as exc:
                url = resolve_url(args.url)
                print(f"atomo {command}: cannot reach the control service at {url}: {exc}", file=sys.stderr)
                return 2

        return run

    return wrap


def compact_count(n: int | None, missing: str = "-") -> str:
    """A count in at most 6 characters (up to 1e21): 12345 -> '12345', 1234567 -> '1.23M'."""
    if n is None:
        return missing
    if abs(n) < 100_000:
        return str(n)
    for suffix, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12), ("P", 1e15), ("E", 1e18)):
        text = f"{n / scale:.3g}"
        if "e" not in text:
            return text + suffix
    return f"{n:.2e}"


def compact_float(x: float | None, decimals: int = 4) -> str:
    """A figure in at most 10 characters: fixed-point from 1e-3 to 1e4 (and 0), scientific beyond."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.{decimals}f}"
    return f"{x:.2e}"


def printable(text: str) -> str:
    """`text` with control characters (a newline in a run name) shown as '?', so one row stays one line."""
    return "".join(c if c.isprintable() else "?" for c in text)


def progress_line(run: dict) -> str:
    step, total = compact_count(run.get("step")), compact_count(run.get("total_steps"), "?")
    parts = [f"{run['id']}  {run['state']:<9}  step {step}/{total}"]
    if run.get("loss") is not None:
        parts.append(f"loss {compact_float(run['loss'])}")
    if run.get("test_accuracy") is not None:
        parts.append(f"test acc {compact_float(run['test_accuracy'])}")
    if run.get("compression_ratio") is not None:
        parts.append(f"compression {compact_float(run['compression_ratio'], 1)}x")
    requested = run["spec"].get("workers", "?")
    if run["state"] == "running" and run.get("workers_training") is not None:
        parts.append(f"workers {run['workers_training']}/{requested}")
    if started_short(run):
        parts.append(f"started with {run['workers_at_start']} of {requested} workers")
    return "  ".join(parts)


def started_short(run: dict) -> bool:
    """Whether the run started training with fewer workers than its spec asked for (min_workers allows it)."""
    at_start, requested = run.get("workers_at_start"), run["spec"].get("workers")
    return at_start is not None and requested is not None and at_start < requested


def short_time(iso: str | None) -> str:
    return "-" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
