"""`atomo up [--workers N] [--port P]`: a PS, N workers and the control service on this machine.

Prints the URL and the API token (generated unless ATOMO_API_TOKEN or --token-file gives one), serves until
interrupted, then stops the workers and the PS.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
from pathlib import Path

from services.control.commands.serve import add_server_arguments, serve


class _Terminated(Exception):
    """SIGTERM: uvicorn shuts down, then re-raises the signal; this turns it into a clean stop of the cluster."""


def _on_sigterm(signum, frame):
    raise _Terminated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--state-dir", default="atomo-state", help="run directories, logs and the control store")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: the cores shared out)")


def run(args: argparse.Namespace) -> int:
    from services.common.launch import ClusterError
    from services.control.auth import check_bind, load_token
    from services.control.launchers import LocalLauncher

    if args.workers < 1:
        print("atomo up: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        token = load_token(args.token_file) or secrets.token_urlsafe(24)
        check_bind(args.host, token, args.allow_unauthenticated)
    except (OSError, ValueError) as exc:
        print(f"atomo up: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir)
    launcher = LocalLauncher(state_dir, args.workers, threads=args.threads)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        endpoint = launcher.start()
        url = f"http://{args.host}:{args.port}"
        print(f"atomo is up: PS control {endpoint}, {args.workers} workers, logs in {state_dir / 'logs'}")
        print(f"export ATOMO_URL={url}")
        print(f"export ATOMO_API_TOKEN={token}", flush=True)
        return serve(args, str(state_dir / "control.db"), endpoint, token)
    except ClusterError as exc:
        print(f"atomo up: the cluster did not start: {exc}", file=sys.stderr)
        return 1
    except _Terminated:
        return 0
    finally:
        launcher.stop()
