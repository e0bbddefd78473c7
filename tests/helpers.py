"""Small helpers shared by the tests that drive real processes."""

from __future__ import annotations

import json
import time

import httpx


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


def dropped_counts(cluster) -> dict[str, float]:
    """atomo_ps_dropped_messages_total by reason, scraped from a LocalCluster PS's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{cluster.ready['metrics_port']}/metrics", timeout=5).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("atomo_ps_dropped_messages_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def strict_json(text: str):
    """JSON as the standard defines it: NaN and Infinity refused."""

    def refuse(name):
        raise ValueError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)
