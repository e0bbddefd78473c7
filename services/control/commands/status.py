"""`atomo status ID`: a run's progress, live until it ends; exit 0 if it succeeded, 1 if it failed or was cancelled."""

from __future__ import annotations

import argparse
import sys
import time

from services.control.commands.common import FINAL, add_connection_arguments, client, progress_line, reports_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--once", action="store_true", help="print the current state and return")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates (default 1)")
    add_connection_arguments(parser)


@reports_errors("status")
def run(args: argparse.Namespace) -> int:
    with client(args) as api:
        current = api.run(args.run_id)
        shown = None
        while True:
            line = progress_line(current)
            if line != shown:
                print(line, flush=True)
                shown = line
            if args.once or current["state"] in FINAL:
                break
            time.sleep(args.interval)
            current = api.run(args.run_id)
    if current["state"] not in FINAL:
        return 0
    succeeded = current["state"] == "succeeded"
    print(f"{current['state']}: {current['reason']}", file=sys.stdout if succeeded else sys.stderr)
    return 0 if succeeded else 1
