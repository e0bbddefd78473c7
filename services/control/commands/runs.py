"""`atomo runs [--state S]`: list runs, newest first."""

from __future__ import annotations

import argparse

from services.control.commands.common import add_connection_arguments, client, reports_errors, short_time
from services.control.store import STATES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", action="append", choices=STATES, help="only runs in this state (repeatable)")
    parser.add_argument("--limit", type=int, default=20, help="at most this many runs (default 20)")
    add_connection_arguments(parser)


@reports_errors("runs")
def run(args: argparse.Namespace) -> int:
    with client(args) as api:
        runs = api.runs(args.state, args.limit)["runs"]
    print(f"{'ID':<17} {'STATE':<9} {'STEP':>11} {'LOSS':>8} {'ACC':>6}  {'CREATED':<19}  NAME")
    for r in runs:
        step = f"{r['step'] if r['step'] is not None else '-'}/{r['total_steps'] or '?'}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.3f}"
        created = short_time(r["created_at"])
        print(f"{r['id']:<17} {r['state']:<9} {step:>11} {loss:>8} {acc:>6}  {created}  {r['name']}")
    return 0
