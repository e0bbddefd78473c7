"""`atomo worker`: one worker. Flags default to ATOMO_* environment variables (container commands)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import socket
import sys

from services.common.argtypes import env_default, heartbeat_seconds, port, positive_int
from services.common.launch import watch_parent

_env = env_default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ps", default=_env("ATOMO_PS", "tcp://127.0.0.1:5555"), help="PS endpoint (ATOMO_PS)")
    parser.add_argument(
        "--id",
        default=_env("ATOMO_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"[-64:]),
        help="stable worker id (ATOMO_WORKER_ID)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=_env("ATOMO_DEVICE", "auto"))
    parser.add_argument(
        "--metrics-port",
        type=port,
        default=_env("ATOMO_METRICS_PORT", None, port),
        help="serve Prometheus metrics on this port (0: a free one, printed on the ready line; ATOMO_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-host",
        default=_env("ATOMO_METRICS_HOST", "127.0.0.1"),
        help="address of the metrics endpoint (default 127.0.0.1; ATOMO_METRICS_HOST=0.0.0.0 to be scraped remotely)",
    )
    parser.add_argument("--keys", default=_env("ATOMO_KEYS"), help="CURVE key directory (`atomo keys`)")
    parser.add_argument("--key-name", default=_env("ATOMO_KEY_NAME"), help="this worker's client key name")
    parser.add_argument(
        "--heartbeat-s",
        type=heartbeat_seconds,
        default=_env("ATOMO_HEARTBEAT_S", 1.0, heartbeat_seconds),
        help="seconds between heartbeats, 0.01 to 3600 (ATOMO_HEARTBEAT_S)",
    )
    parser.add_argument("--data-root", default=_env("ATOMO_DATA_ROOT"), help="where data sets are found")
    parser.add_argument(
        "--threads", type=positive_int, default=_env("ATOMO_THREADS", None, positive_int), help="torch CPU threads"
    )
    parser.add_argument("--log-level", default=_env("ATOMO_LOG_LEVEL", "INFO"))


def run(args: argparse.Namespace) -> int:
    watch_parent()
    from services.common.transport import CurveKeys
    from services.worker.worker import Worker, install_signal_handlers

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    metrics_port = args.metrics_port
    if metrics_port is not None:
        from prometheus_client import start_http_server

        try:
            httpd, _thread = start_http_server(metrics_port, addr=args.metrics_host)
        except OSError as exc:
            print(f"atomo worker: cannot serve metrics on {args.metrics_host}:{metrics_port}: {exc}", file=sys.stderr)
            return 1
        metrics_port = httpd.server_port
    worker = Worker(
        args.ps,
        args.id,
        device=args.device,
        keys=CurveKeys.load(args.keys, "client", args.key_name) if args.keys else None,
        heartbeat_s=args.heartbeat_s,
        metrics_port=metrics_port,
        data_root=args.data_root,
    )
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    install_signal_handlers(worker)
    print(json.dumps({"ready": True, "id": args.id, "metrics_port": metrics_port}), flush=True)
    worker.serve()
    return 0
