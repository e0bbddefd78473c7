"""Argument types for the command line: each converts a flag's text and refuses out-of-range values with a
message argparse prints as `atomo CMD: error: argument --flag: ...` (exit 2, no traceback)."""

from __future__ import annotations

import argparse
import math
import os
import sys


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (pick a free one) to 65535."""
    value = _number(text, int, "a port number from 0 to 65535")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {value}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value:g}")
    return value


HEARTBEAT_S = (0.01, 3600.0)  # ZeroMQ takes the interval in whole milliseconds (an int): 10 ms to an hour


def heartbeat_seconds(text: str) -> float:
    """--heartbeat-s: seconds between ZeroMQ heartbeats, from HEARTBEAT_S[0] to HEARTBEAT_S[1] (1e308 overflowed
    the socket option; below 10 ms the interval rounds to 0, which switches heartbeats off)."""
    low, high = HEARTBEAT_S
    value = _number(text, float, f"a number of seconds from {low:g} to {high:g}")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected a number of seconds from {low:g} to {high:g}, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1], such as a target accuracy."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value:g}")
    return value


def env_default(name: str, default=None, kind=str):
    """The environment variable `name` converted by `kind` (a container command's flag default), else `default`.
    A bad value exits 2 naming the variable, as a bad flag would."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return kind(value)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"atomo: {name}={value!r}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
