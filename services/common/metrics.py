"""Prometheus metric names: the one source of truth for the services, the chart and the dashboards.

Latencies are histograms in seconds. Labels are bounded: run id, codec name, worker id, drop reason.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # "histogram", "counter" or "gauge"
    help: str
    labels: tuple[str, ...] = ()


WORKER_LABELS = ("run", "codec", "worker")
RUN_LABELS = ("run", "codec")

WORKER_METRICS = (
    MetricDef("atomo_worker_compute_seconds", "histogram", "Forward and backward pass time", WORKER_LABELS),
    MetricDef("atomo_worker_encode_seconds", "histogram", "Gradient encoding time", WORKER_LABELS),
    MetricDef(
        "atomo_worker_communication_seconds",
        "histogram",
        "From sending the gradient until the next update is in hand, minus the PS's processing time",
        WORKER_LABELS,
    ),
    MetricDef("atomo_worker_sent_bytes_total", "counter", "Bytes of gradient messages sent", WORKER_LABELS),
    MetricDef("atomo_worker_received_bytes_total", "counter", "Bytes of update messages received", WORKER_LABELS),
)

PS_METRICS = (
    MetricDef("atomo_ps_decode_seconds", "histogram", "Decoding and aggregating one gradient message", RUN_LABELS),
    MetricDef("atomo_ps_update_seconds", "histogram", "Optimizer step and downlink encoding", RUN_LABELS),
    MetricDef(
        "atomo_ps_wait_seconds",
        "histogram",
        "From publishing step t until the k-th gradient of step t arrives (communication overhead)",
        RUN_LABELS,
    ),
    MetricDef("atomo_ps_step_seconds", "histogram", "Wall time of one synchronous step", RUN_LABELS),
    MetricDef("atomo_ps_received_bytes_total", "counter", "Bytes received from workers", RUN_LABELS),
    MetricDef("atomo_ps_sent_bytes_total", "counter", "Bytes sent to workers", RUN_LABELS),
    MetricDef("atomo_ps_dropped_messages_total", "counter", "Messages dropped, by reason", ("reason",)),
    MetricDef("atomo_ps_workers", "gauge", "Live registered workers"),
    MetricDef("atomo_run_step", "gauge", "Current step of the run", RUN_LABELS),
    MetricDef("atomo_run_loss", "gauge", "Training loss of the latest step", RUN_LABELS),
    MetricDef("atomo_run_test_accuracy", "gauge", "Latest test accuracy", RUN_LABELS),
    MetricDef("atomo_run_compression_ratio", "gauge", "Dense bytes over sent bytes, uplink", RUN_LABELS),
)

CONTROL_METRICS = (
    MetricDef("atomo_control_runs", "gauge", "Runs in the store, by state", ("state",)),
    MetricDef(
        "atomo_control_http_request_duration_seconds",
        "histogram",
        "HTTP request latency",
        ("method", "route", "status"),
    ),
    MetricDef("atomo_control_run_duration_seconds", "histogram", "Wall time of finished runs"),
    # The HTTP server's own figures (services/control/connections.py, middleware.py).
    MetricDef("atomo_control_http_requests_in_flight", "gauge", "HTTP requests being served"),
    MetricDef("atomo_control_http_connections", "gauge", "Open HTTP connections"),
    MetricDef(
        "atomo_control_http_connections_closed_total",
        "counter",
        "HTTP connections the service closed: header_timeout, header_too_large, evicted (idle, for a new one), "
        "refused (all busy)",
        ("reason",),
    ),
)

ALL_METRICS = WORKER_METRICS + PS_METRICS + CONTROL_METRICS


def create(defs, registry=None) -> dict:
    """Instantiate prometheus-client metrics for `defs`, keyed by name."""
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    kinds = {"histogram": Histogram, "counter": Counter, "gauge": Gauge}
    registry = REGISTRY if registry is None else registry
    out = {}
    for d in defs:
        # prometheus-client appends _total to counters itself.
        name = d.name.removesuffix("_total") if d.kind == "counter" else d.name
        out[d.name] = kinds[d.kind](name, d.help, d.labels, registry=registry)
    return out
