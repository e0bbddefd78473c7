"""`atomo ps`: the parameter server. Flags default to ATOMO_* environment variables (container commands)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys

import yaml
import zmq

from services.common.argtypes import (
    env_default,
    heartbeat_seconds,
    non_negative_int,
    port,
    positive_float,
    positive_int,
)
from services.common.launch import watch_parent
from services.common.spec import RunSpec
from services.ps.training import MAX_DECODE_TIMEOUT_S


def decode_timeout(text: str) -> float:
    """--plugin-decode-timeout-s: a positive number of seconds, at most MAX_DECODE_TIMEOUT_S."""
    value = positive_float(text)
    if value > MAX_DECODE_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_DECODE_TIMEOUT_S:g} seconds, got {value:g}")
    return value


_env = env_default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bind", default=_env("ATOMO_PS_BIND", "127.0.0.1"), help="host to bind (ATOMO_PS_BIND)")
    parser.add_argument(
        "--port", type=port, default=_env("ATOMO_PS_PORT", 5555, port), help="worker port (ATOMO_PS_PORT)"
    )
    parser.add_argument(
        "--control-port", type=port, default=_env("ATOMO_PS_CONTROL_PORT", 5556, port), help="control REP port"
    )
    parser.add_argument("--state-dir", default=_env("ATOMO_STATE_DIR", "atomo-state"), help="runs live here")
    parser.add_argument("--spec", help="a RunSpec file (YAML or JSON) to run at start")
    parser.add_argument("--run-id", help="run id of --spec (default: its name and the time)")
    parser.add_argument("--exit-after-run", action="store_true", help="exit when the started or resumed run ends")
    parser.add_argument("--keys", default=_env("ATOMO_KEYS"), help="CURVE key directory (`atomo keys`)")
    parser.add_argument(
        "--metrics-port",
        type=port,
        default=_env("ATOMO_METRICS_PORT", None, port),
        help="serve Prometheus metrics on this port of --bind (0: a free one, printed on the ready line)",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=heartbeat_seconds,
        default=_env("ATOMO_HEARTBEAT_S", 1.0, heartbeat_seconds),
        help="seconds between heartbeats, 0.01 to 3600 (ATOMO_HEARTBEAT_S)",
    )
    parser.add_argument(
        "--check-every",
        type=non_negative_int,
        default=_env("ATOMO_CHECK_EVERY", 10, non_negative_int),
        help="replica check period (steps)",
    )
    parser.add_argument(
        "--worker-timeout-s",
        type=positive_float,
        default=_env("ATOMO_WORKER_TIMEOUT_S", 120.0, positive_float),
        help="fail a run that has had fewer than min_workers workers this long",
    )
    parser.add_argument(
        "--step-timeout-s",
        type=positive_float,
        default=_env("ATOMO_STEP_TIMEOUT_S", 60.0, positive_float),
        help="least time a worker has to send a step's gradient before it leaves the run (default 60; the "
        "deadline grows to 20 times the median recent step time)",
    )
    parser.add_argument(
        "--plugin-decode-timeout-s",
        type=decode_timeout,
        default=_env("ATOMO_PLUGIN_DECODE_TIMEOUT_S", None, decode_timeout),
        help="most time a plugin codec may take to decode one gradient; longer fails the run naming the plugin "
        "(default: twice --heartbeat-s, so that the PS's loop never stalls long enough to lose its workers)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=_env("ATOMO_DEVICE", "auto"))
    parser.add_argument("--data-root", default=_env("ATOMO_DATA_ROOT"), help="where data sets are found")
    parser.add_argument(
        "--threads", type=positive_int, default=_env("ATOMO_THREADS", None, positive_int), help="torch CPU threads"
    )
    parser.add_argument(
        "--allow-remote-without-keys", action="store_true", help="serve a non-loopback host without CURVE keys"
    )
    parser.add_argument("--log-level", default=_env("ATOMO_LOG_LEVEL", "INFO"))


def load_spec(path: str) -> RunSpec:
    with open(path, encoding="utf-8") as f:
        return RunSpec.model_validate(yaml.safe_load(f) or {})


def run(args: argparse.Namespace) -> int:
    watch_parent()
    from services.common.transport import CurveKeys, is_loopback

    if not args.keys and not is_loopback(args.bind) and not args.allow_remote_without_keys:
        print(
            f"atomo ps: refusing to serve {args.bind} without CURVE keys: any host could join as a worker.\n"
            "Give --keys DIR (make them with `atomo keys DIR`), bind 127.0.0.1, or pass "
            "--allow-remote-without-keys on a trusted network.",
            file=sys.stderr,
        )
        return 2
    from services.ps.server import ParameterServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = load_spec(args.spec) if args.spec else None
    try:
        ps = ParameterServer(
            bind=args.bind,
            port=args.port,
            control_port=args.control_port,
            state_dir=args.state_dir,
            keys=CurveKeys.load(args.keys, "server") if args.keys else None,
            metrics_port=args.metrics_port,
            heartbeat_s=args.heartbeat_s,
            check_every=args.check_every,
            worker_timeout_s=args.worker_timeout_s,
            step_timeout_s=args.step_timeout_s,
            plugin_decode_timeout_s=args.plugin_decode_timeout_s,
            device=args.device,
            data_root=args.data_root,
            allow_remote_without_keys=args.allow_remote_without_keys,
        )
    except zmq.ZMQError as exc:
        print(f"atomo ps: cannot bind --port {args.port} / --control-port {args.control_port}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the metrics port (http.server) or the state directory
        print(f"atomo ps: {exc}", file=sys.stderr)
        return 1
    if ps.run is None and spec is not None:
        try:
            ps.submit(args.run_id, spec)
        except ValueError as exc:
            print(f"atomo ps: {exc}", file=sys.stderr)
            ps.close()
            return 2
    if args.exit_after_run and ps.run is not None:
        ps.exit_after = ps.run.run_id
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    signal.signal(signal.SIGTERM, lambda *_: setattr(ps, "stopping", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(ps, "stopping", True))
    ready = {"ready": True, **ps.public(), "run_id": ps.run.run_id if ps.run else None}
    print(json.dumps(ready), flush=True)
    ps.serve()
    if ps.exit_after is not None:
        return 0 if ps.run is not None and ps.run.state == "succeeded" else 1
    return 0
