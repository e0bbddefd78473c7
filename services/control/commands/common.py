"""What the client commands share: --url/--token, the client, and one way to report errors."""

from __future__ import annotations

import argparse
import functools
import sys
from datetime import datetime

import httpx

from services.control.client import DEFAULT_URL, TOKEN_ENV, URL_ENV, ApiError, Client

FINAL = ("succeeded", "failed", "cancelled")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"control service URL (default: ${URL_ENV} or {DEFAULT_URL})")
    parser.add_argument("--token", help=f"API token (default: ${TOKEN_ENV})")


def client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token)


def reports_errors(command: str):
    """Turn API and connection errors into a one-line message on stderr and a non-zero exit code."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except ApiError as exc:
                print(f"atomo {command}: {exc.message} ({exc.status} {exc.code})", file=sys.stderr)
                for d in exc.details if isinstance(exc.details, list) else []:
                    print(f"  {d.get('field', '?')}: {d.get('message', '')}", file=sys.stderr)
                return 1
            except httpx.HTTPError as exc:
                url = args.url or "$" + URL_ENV + " or " + DEFAULT_URL
                print(f"atomo {command}: cannot reach the control service at {url}: {exc}", file=sys.stderr)
                return 2

        return run

    return wrap


def progress_line(run: dict) -> str:
    step = "-" if run.get("step") is None else str(run["step"])
    total = "?" if run.get("total_steps") is None else str(run["total_steps"])
    parts = [f"{run['id']}  {run['state']:<9}  step {step}/{total}"]
    if run.get("loss") is not None:
        parts.append(f"loss {run['loss']:.4f}")
    if run.get("test_accuracy") is not None:
        parts.append(f"test acc {run['test_accuracy']:.4f}")
    if run.get("compression_ratio") is not None:
        parts.append(f"compression {run['compression_ratio']:.1f}x")
    return "  ".join(parts)


def short_time(iso: str | None) -> str:
    return "-" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
