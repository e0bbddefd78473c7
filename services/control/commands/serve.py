"""`atomo serve`: the control service alone, pointing at a PS control endpoint."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from services.common.argtypes import port as port_type
from services.common.argtypes import positive_float, positive_int
from services.control.client import TOKEN_ENV

if TYPE_CHECKING:
    from services.control.connections import ConnectionLimits

PS_ENV = "ATOMO_PS_CONTROL"
# File descriptors kept for everything but HTTP connections: the store's connections (three descriptors for
# each thread of the threadpool and the scheduler), the ZeroMQ sockets, the listening socket, logs.
RESERVED_FDS = 256
log = logging.getLogger("atomo.control")


def add_server_arguments(parser: argparse.ArgumentParser, port: int = 8080) -> None:
    """The HTTP and store options that `serve` and `up` share."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=port_type, default=port, help=f"HTTP port (default {port})")
    parser.add_argument("--token-file", help=f"file holding the API token (${TOKEN_ENV} takes precedence)")
    parser.add_argument(
        "--allow-unauthenticated", action="store_true", help="serve without a token on a non-loopback address"
    )
    parser.add_argument(
        "--max-body-bytes", type=positive_int, default=1 << 20, help="request body limit (default 1 MiB)"
    )
    parser.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a request's whole body may take to arrive after its headers; 408 beyond (default 30)",
    )
    parser.add_argument(
        "--header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a request's headers may take to arrive, from the connection or the previous response; "
        "then 408 and the connection is closed (default 10)",
    )
    parser.add_argument(
        "--max-header-bytes",
        type=positive_int,
        default=64 << 10,
        help="a request line and headers larger than this are answered 431 (default 64 KiB)",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=512,
        help="open HTTP connections; beyond, a new one closes the longest-idle one, or is answered 503 when "
        f"all are busy (default 512; lowered to the open-file limit minus {RESERVED_FDS} if that is less)",
    )
    parser.add_argument(
        "--read-cache-bytes",
        type=positive_int,
        default=64 << 20,
        help="memory for the cached answers of the read routes (default 64 MiB)",
    )
    parser.add_argument(
        "--poll-interval", type=positive_float, default=0.5, help="seconds between PS polls (default 0.5)"
    )
    parser.add_argument(
        "--lost-after",
        type=positive_float,
        default=120.0,
        help="fail the active run after the PS is unreachable this long",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument(
        "--access-log", action="store_true", help="log every request (off: the latency histogram counts them)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument(
        "--ps",
        default=os.environ.get(PS_ENV, "tcp://127.0.0.1:5556"),
        help=f"the PS control endpoint (default ${PS_ENV} or tcp://127.0.0.1:5556)",
    )
    parser.add_argument("--db", default="atomo-control.db", help="SQLite store path (default atomo-control.db)")
    parser.add_argument("--curve-keys", help="CURVE key directory (`atomo keys`) when the PS control port uses CURVE")
    parser.add_argument("--curve-client", help="the client key name in DIR/clients to use (default: the only one)")
    parser.add_argument(
        "--launcher",
        choices=("none", "kubernetes"),
        default=os.environ.get("ATOMO_LAUNCHER", "none"),
        help="kubernetes: scale the worker StatefulSet(s) per run (in-cluster config, ATOMO_K8S_* variables; "
        "needs atomo[kubernetes]); none: the workers are managed elsewhere (default $ATOMO_LAUNCHER or none)",
    )
    parser.add_argument(
        "--worker-wait-timeout",
        type=positive_float,
        default=600.0,
        help="kubernetes: fail a run whose workers have not all registered after this many seconds (default 600)",
    )
    parser.add_argument(
        "--release-after",
        type=positive_float,
        default=60.0,
        help="kubernetes: scale the workers to the idle count after the queue has been empty this long (default 60)",
    )


def serve(
    args: argparse.Namespace,
    db_path: str,
    ps_endpoint: str,
    token: str | None,
    curve=None,
    launcher=None,
    sock: socket.socket | None = None,
    scaler=None,
) -> int:
    """Run the control service in the foreground until interrupted; on `sock` if given (already bound and
    listening), else on --host/--port. `launcher`: the one that supervises the PS (`atomo up`), or None;
    `scaler`: the Kubernetes launcher that scales the workers per run, or None."""
    import uvicorn

    from services.control.app import Settings, create_app
    from services.control.connections import ConnectionLimits

    settings = Settings(
        db_path=db_path,
        ps_endpoint=ps_endpoint,
        token=token,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        read_cache_bytes=args.read_cache_bytes,
        poll_interval_s=args.poll_interval,
        lost_after_s=args.lost_after,
        curve=curve,
        worker_wait_s=getattr(args, "worker_wait_timeout", 600.0),
        release_after_s=getattr(args, "release_after", 60.0),
    )
    app = create_app(settings, launcher, scaler)
    max_connections = fd_bounded_connections(args.max_connections)
    limits = ConnectionLimits(args.header_timeout, max_connections, args.max_header_bytes, app.state.metrics)
    config = server_config(app, limits, host=args.host, port=args.port, log_level=args.log_level)
    config.access_log = args.access_log
    server = uvicorn.Server(config)
    server.run(sockets=[sock] if sock is not None else None)
    return 0


def server_config(app, limits: ConnectionLimits, **options):
    """The uvicorn configuration of the control service: its HTTP protocol enforces `limits`
    (services/control/connections.py); no WebSocket upgrades; `options` as uvicorn.Config takes them."""
    import uvicorn

    from services.control.connections import protocol_class

    return uvicorn.Config(app, http=protocol_class(limits), ws="none", **options)


def fd_bounded_connections(max_connections: int) -> int:
    """`max_connections`, after raising the soft open-file limit toward the hard one so that it fits with
    RESERVED_FDS to spare; lowered (with a warning) when the hard limit is too small for it: to the limit
    less RESERVED_FDS, or less half the limit when that is smaller."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        if soft < needed:
            fitted = soft - min(RESERVED_FDS, soft // 2)
            log.warning(
                "--max-connections %d lowered to %d: the open-file limit is %d (ulimit -n)",
                max_connections,
                fitted,
                soft,
            )
            return fitted
    return max_connections


def run(args: argparse.Namespace) -> int:
    from services.control.auth import check_bind, load_token

    curve = scaler = None
    try:
        token = load_token(args.token_file)
        check_bind(args.host, token, args.allow_unauthenticated)
        if args.curve_keys:
            from services.common.transport import CurveKeys

            curve = CurveKeys.load(args.curve_keys, "client", args.curve_client)
        if args.launcher == "kubernetes":
            scaler = _kubernetes_launcher()
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"atomo serve: {exc}", file=sys.stderr)
        return 2
    return serve(args, args.db, args.ps, token, curve, scaler=scaler)


def _kubernetes_launcher():
    """The Kubernetes launcher from the ATOMO_K8S_* variables; a RuntimeError that says what is missing."""
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise RuntimeError("--launcher kubernetes needs the kubernetes package: pip install 'atomo[kubernetes]'") from (
            None
        )
    from services.control.kubernetes import KubernetesLauncher

    return KubernetesLauncher.from_env()
