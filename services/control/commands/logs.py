"""`atomo logs ID [--follow]`: the run's events (state changes, worker joins and losses)."""

from __future__ import annotations

import argparse
import json
import time

from services.control.commands.common import FINAL, add_connection_arguments, client, reports_errors, short_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new events until the run ends")
    add_connection_arguments(parser)


@reports_errors("logs")
def run(args: argparse.Namespace) -> int:
    since = 0
    with client(args) as api:
        while True:
            page = api.events(args.run_id, since)
            for e in page["events"]:
                print(f"{short_time(e['time'])}  {e['type']:<16} {json.dumps(e['detail'], sort_keys=True)}", flush=True)
            since = page["next_since"]
            if not args.follow or (not page["events"] and api.run(args.run_id)["state"] in FINAL):
                break
            time.sleep(1.0)
    return 0
