"""`atomo up [--workers N] [--port P]`: a PS, N workers and the control service on this machine.

In this order: create the default state directory ./atomo-state if missing, with a `.gitignore` of `*`
(services.common.folders), resolve the API token (ATOMO_API_TOKEN, else --token-file, else the one kept in
`<state-dir>/api-token`, made with mode 0600 on first use and replaced with --rotate-token), bind the HTTP
port (a busy port fails here, before anything starts or any token is shown), start the cluster, print the
URL, the token and every process's metrics endpoint, and serve until interrupted; then stop the workers and
the PS. The processes are supervised (docs/control.md, "The supervisor"): the PS is restarted if it dies or
stops answering on its control port for --ps-liveness-timeout-s, a worker if it dies. The state directory
is made private (0700) when this creates it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from services.common.argtypes import port, positive_float, positive_int
from services.common.folders import STATE_DIR, make_default_folder
from services.control.commands.serve import add_server_arguments, serve

TOKEN_FILE = "api-token"


class _Terminated(Exception):
    """SIGTERM: uvicorn shuts down, then re-raises the signal; this turns it into a clean stop of the cluster."""


def _on_sigterm(signum, frame):
    raise _Terminated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=STATE_DIR,
        help=f"run directories, logs and the control store (default ./{STATE_DIR}, made with a .gitignore of '*' "
        "so that git leaves it out)",
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch threads per process (default: the cores shared out)"
    )
    parser.add_argument(
        "--metrics-port",
        type=port,
        default=0,
        help="Prometheus metrics: the PS on this port, worker i on the port + 1 + i (default: free ports, printed)",
    )
    parser.add_argument(
        "--rotate-token", action="store_true", help=f"replace the token kept in <state-dir>/{TOKEN_FILE}"
    )
    parser.add_argument(
        "--ps-liveness-timeout-s",
        type=positive_float,
        help="restart the PS when its control port has not answered this long (default 60 s)",
    )


def bind_http(host: str, http_port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, http_port), family=family, backlog=2048)


def run(args: argparse.Namespace) -> int:
    from services.common.launch import ClusterError
    from services.control.auth import check_bind, load_token, stored_token
    from services.control.launchers import LocalLauncher

    state_dir = Path(args.state_dir)
    token_path = state_dir / TOKEN_FILE
    try:
        make_default_folder(state_dir, STATE_DIR)  # before it exists: ./atomo-state gets its .gitignore
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = load_token(args.token_file)
        source = "from $ATOMO_API_TOKEN or --token-file"
        if token is None:
            token, reused = stored_token(token_path, args.rotate_token)
            source = f"{'reused from' if reused else 'new, kept in'} {token_path} (--rotate-token for a new one)"
        check_bind(args.host, token, args.allow_unauthenticated)
    except (OSError, ValueError) as exc:
        print(f"atomo up: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind_http(args.host, args.port)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"atomo up: cannot bind {args.host}:{args.port} ({why}); choose another --port", file=sys.stderr)
        return 1
    launcher = LocalLauncher(
        state_dir,
        args.workers,
        supervise=True,
        **({"liveness_timeout_s": args.ps_liveness_timeout_s} if args.ps_liveness_timeout_s else {}),
        threads=args.threads,
        metrics_base=args.metrics_port,
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        endpoint = launcher.start()
        url = f"http://{args.host}:{args.port}"
        print(f"atomo is up: PS control {endpoint}, {args.workers} workers, logs in {state_dir / 'logs'}")
        print(f"export ATOMO_URL={url}")
        print(f"export ATOMO_API_TOKEN={token}")
        endpoints = ", ".join(
            f"{name} http://127.0.0.1:{p}/metrics" for name, p in launcher.cluster.metrics_ports.items()
        )
        print(f"# metrics: {endpoints}")
        print(f"# the token: {source}", flush=True)
        return serve(args, str(state_dir / "control.db"), endpoint, token, launcher=launcher, sock=sock)
    except ClusterError as exc:
        print(f"atomo up: the cluster did not start: {exc}", file=sys.stderr)
        return 1
    except _Terminated:
        return 0
    finally:
        launcher.stop()
        sock.close()
