"""`atomo runs [--state S]`: list runs, newest first: id, state, model, codec, progress, workers, creation."""

from __future__ import annotations

import argparse

from services.control.commands.common import (
    add_connection_arguments,
    client,
    compact_count,
    compact_float,
    printable,
    reports_errors,
    short_time,
    started_short,
)
from services.control.store import STATES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", action="append", choices=STATES, help="only runs in this state (repeatable)")
    parser.add_argument("--limit", type=int, default=20, help="at most this many runs (default 20)")
    add_connection_arguments(parser)


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


@reports_errors("runs")
def run(args: argparse.Namespace) -> int:
    with client(args) as api:
        runs = api.runs(args.state, args.limit)["runs"]
    # Fixed widths: counts take at most 6 characters (1.23M) and figures 10 (1.23e+30), so rows stay aligned;
    # a model or codec name longer than its column (a plugin codec's) is cut with a "~".
    header = f"{'ID':<17} {'STATE':<9} {'MODEL':<9} {'CODEC':<10} {'STEP':>13} {'LOSS':>10} {'ACC':>6}"
    print(f"{header} {'WORKERS':>7}  {'CREATED':<19}  NAME")
    for r in runs:
        spec = r["spec"]
        model = fit(printable(str(spec.get("model", "-"))), 9)
        codec = fit(printable(str((spec.get("codec") or {}).get("name", "-"))), 10)
        step = f"{compact_count(r['step'])}/{compact_count(r['total_steps'], '?')}"
        loss = compact_float(r["loss"])
        acc = compact_float(r["test_accuracy"], 3)
        at_start = r.get("workers_at_start")
        workers = f"{'-' if at_start is None else at_start}/{spec.get('workers', '-')}"
        created = short_time(r["created_at"])
        print(
            f"{r['id']:<17} {r['state']:<9} {model:<9} {codec:<10} {step:>13} {loss:>10} {acc:>6} {workers:>7}  "
            f"{created}  " + printable(r["name"])
        )
    short = [r["id"] for r in runs if started_short(r)]
    if short:
        print(f"WORKERS: at the start / requested; started with fewer workers than requested: {', '.join(short)}")
    return 0
