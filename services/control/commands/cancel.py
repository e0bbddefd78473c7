"""`atomo cancel ID`: cancel a queued or running run (idempotent)."""

from __future__ import annotations

import argparse

from services.control.commands.common import add_connection_arguments, client, reports_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    add_connection_arguments(parser)


@reports_errors("cancel")
def run(args: argparse.Namespace) -> int:
    with client(args) as api:
        run = api.cancel(args.run_id)
    pending = " (cancel requested; the PS stops it at the next step)" if run["state"] != "cancelled" else ""
    print(f"{run['id']}  {run['state']}{pending}")
    return 0
