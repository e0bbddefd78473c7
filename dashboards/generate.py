"""Generate the Grafana dashboards and the Prometheus alert rules, and the chart's copies of them.

    python dashboards/generate.py           write dashboards/*.json, dashboards/alerts.yaml and the same files
                                            under charts/atomo/files/ (the chart ships them)
    python dashboards/generate.py --check   exit 1 if any committed file differs from what this script writes

Plain dictionaries rather than a dashboard SDK: the JSON model is small and stable, and the output is easy to
read in review. Metric names come from services/common/metrics.py (tests/test_dashboards.py checks that every
name used here exists there and that every metric there is on some panel).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART_FILES = ROOT / "charts" / "atomo" / "files"
SCHEMA_VERSION = 41  # Grafana 11.x / 12.x dashboard JSON model
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every series is scoped to the release: `namespace` and `release` are the scrape's target labels (the chart's
# ServiceMonitor sets `release` from the pods' app.kubernetes.io/instance), so releases sharing a Prometheus
# stay apart on every panel.
SCOPE = 'namespace=~"$namespace", release=~"$release"'
SEL = SCOPE + ', run=~"$run", codec=~"$codec"'  # and the run and codec variables
RATE = "$__rate_interval"


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(title: str, description: str, targets: list[tuple[str, str]], unit: str, stacked: bool = False):
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 30 if stacked else 0, "showPoints": "never"}
    custom["stacking"] = {"mode": "normal" if stacked else "none", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def quantiles(metric: str, by: str, selector: str, legend: str) -> list[tuple[str, str]]:
    """p50 and p95 of a histogram, per `by` label."""
    return [
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{legend} p{round(q * 100)}",
        )
        for q in (0.5, 0.95)
    ]


def mean_per_step(metric: str, phase: str) -> tuple[str, str]:
    """Mean seconds of one phase per step, per codec: rate(sum) / rate(count)."""
    expr = (
        f"sum by (codec) (rate({metric}_sum{{{SEL}}}[{RATE}])) / sum by (codec) (rate({metric}_count{{{SEL}}}[{RATE}]))"
    )
    return expr, f"{{{{codec}}}} {phase}"


def per_step_bytes(counter: str, direction: str) -> tuple[str, str]:
    """Bytes per synchronous step: the PS's byte counter over its step count, per codec."""
    expr = (
        f"sum by (codec) (rate({counter}{{{SEL}}}[{RATE}]))"
        f" / sum by (codec) (rate(atomo_ps_step_seconds_count{{{SEL}}}[{RATE}]))"
    )
    return expr, f"{{{{codec}}}} {direction}"


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(items: list[dict]) -> list[dict]:
    """Ids and grid positions: rows span the width, panels fill rows of two (12 columns each, 8 high)."""
    panels, y, x = [], 0, 0
    for i, item in enumerate(items, start=1):
        item = {"id": i, **item}
        if item["type"] == "row":
            y += 8 if x else 0
            item["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y, x = y + 1, 0
        else:
            item["gridPos"] = {"h": 8, "w": 12, "x": x, "y": y}
            x = (x + 12) % 24
            y += 8 if x == 0 else 0
        panels.append(item)
    return panels


def query_variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
        "hide": 0,
    }


def variables(with_runs: bool) -> list[dict]:
    """The data source, then the release's namespace and name (from a metric every release has: the PS's
    live workers on the training board, the control service's runs on the control board), then run and codec."""
    out = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
        }
    ]
    anchor = "atomo_ps_workers" if with_runs else "atomo_control_runs"
    out.append(query_variable("namespace", "Namespace", f"label_values({anchor}, namespace)"))
    out.append(query_variable("release", "Release", f'label_values({anchor}{{namespace=~"$namespace"}}, release)'))
    if with_runs:
        out.append(query_variable("run", "Run", f"label_values(atomo_run_step{{{SCOPE}}}, run)"))
        out.append(query_variable("codec", "Codec", f'label_values(atomo_run_step{{{SCOPE}, run=~"$run"}}, codec)'))
    return out


def dashboard(uid: str, title: str, description: str, items: list[dict], with_runs: bool) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["atomo"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": variables(with_runs)},
        "annotations": {"list": []},
        "links": [],
        "panels": layout(items),
    }


def training() -> dict:
    items = [
        row("Latency per step (the paper's Figure 2)"),
        # One stack per codec (the panel repeats for each selected codec): stacking two codecs' phases
        # together would add up times that never happen together.
        {
            **timeseries(
                "Step time split: compute, encode, communication ($codec)",
                "Mean seconds per step of each worker phase, stacked; one panel per codec.",
                [
                    mean_per_step("atomo_worker_compute_seconds", "compute"),
                    mean_per_step("atomo_worker_encode_seconds", "encode"),
                    mean_per_step("atomo_worker_communication_seconds", "communication"),
                ],
                "s",
                stacked=True,
            ),
            "repeat": "codec",
            "repeatDirection": "h",
            "maxPerRow": 2,
        },
        timeseries(
            "PS step time",
            "Wall time of one synchronous step at the PS, p50 and p95 per codec.",
            quantiles("atomo_ps_step_seconds", "codec", SEL, "{{codec}}"),
            "s",
        ),
        timeseries(
            "Worker encode",
            "Gradient encoding time, p50 and p95 per codec.",
            quantiles("atomo_worker_encode_seconds", "codec", SEL, "{{codec}}"),
            "s",
        ),
        timeseries(
            "Worker compute",
            "Forward and backward pass time, p50 and p95 per codec.",
            quantiles("atomo_worker_compute_seconds", "codec", SEL, "{{codec}}"),
            "s",
        ),
        timeseries(
            "Worker communication",
            "From sending the gradient until the next update is in hand, minus the PS's processing time.",
            quantiles("atomo_worker_communication_seconds", "codec", SEL, "{{codec}}"),
            "s",
        ),
        timeseries(
            "PS wait",
            "From publishing step t until the k-th gradient of step t arrives, p50 and p95 per codec.",
            quantiles("atomo_ps_wait_seconds", "codec", SEL, "{{codec}}"),
            "s",
        ),
        timeseries(
            "PS decode",
            "Decoding and aggregating one gradient message, p50 and p95 per codec.",
            quantiles("atomo_ps_decode_seconds", "codec", SEL, "{{codec}}"),
            "s",
        ),
        timeseries(
            "PS update",
            "Optimizer step and downlink encoding, p50 and p95 per codec.",
            quantiles("atomo_ps_update_seconds", "codec", SEL, "{{codec}}"),
            "s",
        ),
        row("Bytes"),
        timeseries(
            "Bytes per step, up and down",
            "Gradient bytes the PS received (up) and update bytes it sent (down) per synchronous step, all workers.",
            [
                per_step_bytes("atomo_ps_received_bytes_total", "up"),
                per_step_bytes("atomo_ps_sent_bytes_total", "down"),
            ],
            "bytes",
        ),
        timeseries(
            "Compression ratio",
            "Dense fp32 bytes over sent bytes, uplink.",
            [(f"atomo_run_compression_ratio{{{SEL}}}", "{{run}} ({{codec}})")],
            "x",
        ),
        timeseries(
            "Bytes per second by worker",
            "Each worker's gradient bytes sent and update bytes received.",
            [
                (f"sum by (worker) (rate(atomo_worker_sent_bytes_total{{{SEL}}}[{RATE}]))", "{{worker}} sent"),
                (
                    f"sum by (worker) (rate(atomo_worker_received_bytes_total{{{SEL}}}[{RATE}]))",
                    "{{worker}} received",
                ),
            ],
            "Bps",
        ),
        row("Training (the paper's Figure 3)"),
        timeseries(
            "Training loss",
            "Training loss of the latest step, per run.",
            [(f"atomo_run_loss{{{SEL}}}", "{{run}} ({{codec}})")],
            "short",
        ),
        timeseries(
            "Test accuracy",
            "Latest test accuracy, per run.",
            [(f"atomo_run_test_accuracy{{{SEL}}}", "{{run}} ({{codec}})")],
            "percentunit",
        ),
        timeseries(
            "Step",
            "Current step of each run.",
            [(f"atomo_run_step{{{SEL}}}", "{{run}} ({{codec}})")],
            "short",
        ),
        row("Cluster"),
        timeseries(
            "Live workers",
            "Workers registered with the PS and heard from, per release.",
            [(f"sum by (namespace, release) (atomo_ps_workers{{{SCOPE}}})", "{{namespace}}/{{release}}")],
            "short",
        ),
        timeseries(
            "Dropped messages by reason",
            "Malformed or stale messages the PS dropped, per second.",
            [(f"sum by (reason) (rate(atomo_ps_dropped_messages_total{{{SCOPE}}}[{RATE}]))", "{{reason}}")],
            "short",
        ),
    ]
    return dashboard(
        "atomo-training",
        "atomo: training",
        "ATOMO runs: latency breakdown, bytes and compression, loss and accuracy, workers and drops.",
        items,
        with_runs=True,
    )


def control() -> dict:
    metric = "atomo_control_http_request_duration_seconds"
    items = [
        row("Control API"),
        timeseries(
            "Requests per second",
            "By route and status.",
            [(f"sum by (route, status) (rate({metric}_count{{{SCOPE}}}[{RATE}]))", "{{route}} {{status}}")],
            "reqps",
        ),
        timeseries("Request latency", "p50 and p95 by route.", quantiles(metric, "route", SCOPE, "{{route}}"), "s"),
        timeseries(
            "Errors per second",
            "Responses with a 5xx status, by route (4xx are the clients' errors and are on the requests panel).",
            [(f'sum by (route) (rate({metric}_count{{{SCOPE}, status=~"5.."}}[{RATE}]))', "{{route}}")],
            "reqps",
        ),
        timeseries(
            "Error ratio",
            "Share of responses with a 5xx status.",
            [
                (
                    f'sum(rate({metric}_count{{{SCOPE}, status=~"5.."}}[{RATE}]))'
                    f" / sum(rate({metric}_count{{{SCOPE}}}[{RATE}]))",
                    "5xx",
                )
            ],
            "percentunit",
        ),
        row("Connections"),
        timeseries(
            "Open connections and requests in flight",
            "HTTP connections open, and requests being served (the limit is atomo serve --max-connections).",
            [
                (f"sum(atomo_control_http_connections{{{SCOPE}}})", "connections"),
                (f"sum(atomo_control_http_requests_in_flight{{{SCOPE}}})", "in flight"),
            ],
            "short",
        ),
        timeseries(
            "Connections closed by the service",
            "Per second, by reason: header_timeout (slow or stalled clients), header_too_large, evicted (the "
            "longest-idle one, for a new connection), refused (every connection busy: 503).",
            [
                (
                    f"sum by (reason) (rate(atomo_control_http_connections_closed_total{{{SCOPE}}}[{RATE}]))",
                    "{{reason}}",
                )
            ],
            "short",
        ),
        row("Runs"),
        timeseries(
            "Runs by state", "Runs in the store, by state.", [(f"atomo_control_runs{{{SCOPE}}}", "{{state}}")], "short"
        ),
        timeseries(
            "Run duration",
            "Wall time of runs that finished in the last hour, p50 and p95.",
            [
                (
                    f"histogram_quantile({q}, sum by (le)"
                    f" (increase(atomo_control_run_duration_seconds_bucket{{{SCOPE}}}[1h])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.95)
            ],
            "s",
        ),
    ]
    return dashboard(
        "atomo-control",
        "atomo: control service",
        "The control service's REST API (rate, latency, errors) and its runs.",
        items,
        with_runs=False,
    )


# The chart's copy of the rules is scoped to its own release: these placeholders in label matchers, which the
# PrometheusRule template replaces with the release's namespace and name (two releases sharing a Prometheus then
# each alert on their own series only, once).
CHART_SCOPE = {"namespace": "RELEASE_NAMESPACE", "release": "RELEASE_NAME"}
BY = "by (namespace, release)"
ON = "on (namespace, release)"


def alerts(scope: dict[str, str] | None = None) -> dict:
    """The alert rules. Every expression aggregates per (namespace, release), so each alert names the release
    it concerns and releases sharing a Prometheus stay apart; `scope` (label: value) also limits every selector
    to one release (the chart's copy)."""
    matchers = ", ".join(f'{k}="{v}"' for k, v in (scope or {}).items())

    def s(metric: str, *more: str) -> str:
        inner = ", ".join(m for m in (matchers, *more) if m)
        return f"{metric}{{{inner}}}" if inner else metric

    running_runs = s("atomo_control_runs", 'state="running"')
    failed_runs = s("atomo_control_runs", 'state="failed"')
    running = f"sum {BY} ({running_runs}) > 0"
    dropped = f"sum {BY} (rate({s('atomo_ps_dropped_messages_total')}[5m]))"
    decoded = f"sum {BY} (rate({s('atomo_ps_decode_seconds_count')}[5m]))"
    if scope:  # this release's control service has no series (never scraped, or no longer)
        control_down = f"absent({s('atomo_control_runs')})"
    else:  # a release whose control service had series in the last hour has none now
        control_down = f"group {BY} (max_over_time(atomo_control_runs[1h])) unless {ON} group {BY} (atomo_control_runs)"
    rules = [
        {
            "alert": "AtomoWorkerLost",
            "expr": f"(max_over_time({s('atomo_ps_workers')}[5m]) - {s('atomo_ps_workers')} > 0) and {ON} ({running})",
            "for": "1m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "A worker was lost during a run",
                "description": "{{ $value }} fewer live workers than in the last 5 minutes while a run of release "
                "{{ $labels.release }} (namespace {{ $labels.namespace }}) is running (the run goes on while at least "
                "min_workers remain). A run that starts with fewer workers than the previous one also fires this "
                "for up to 5 minutes.",
            },
        },
        {
            "alert": "AtomoPSStalled",
            "expr": f"({running}) unless {ON} (sum {BY} (changes({s('atomo_run_step')}[10m])) > 0)",
            "for": "5m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "The PS makes no step progress",
                "description": "A run of release {{ $labels.release }} (namespace {{ $labels.namespace }}) is "
                "running but no run's step has changed for 15 minutes: the PS or its workers are stuck, or the PS "
                "is no longer scraped.",
            },
        },
        {
            "alert": "AtomoHighDropRate",
            # A release whose PS decoded nothing at all drops 100%: its dropped rate times 0 stands in.
            "expr": f"{dropped} / ({dropped} + ({decoded} or {dropped} * 0)) > 0.05",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "The PS drops more than 5% of the messages it receives",
                "description": "{{ $value | humanizePercentage }} of the messages reaching the PS of release "
                "{{ $labels.release }} (namespace {{ $labels.namespace }}) are dropped "
                "(atomo_ps_dropped_messages_total by reason says why).",
            },
        },
        {
            "alert": "AtomoRunFailed",
            "expr": f"delta({failed_runs}[10m]) > 0",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "A run failed",
                "description": "A run of release {{ $labels.release }} (namespace {{ $labels.namespace }}) failed "
                "in the last 10 minutes: `atomo runs --state failed` and `atomo logs RUN_ID` give the reason.",
            },
        },
        {
            "alert": "AtomoControlDown",
            "expr": control_down,
            "for": "2m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "The control service is down",
                "description": "No atomo_control_runs series of release {{ $labels.release }} (namespace "
                "{{ $labels.namespace }}) for 2 minutes: the control service is down or Prometheus no longer "
                "scrapes it.",
            },
        },
    ]
    return {"groups": [{"name": "atomo", "rules": rules}]}


def render() -> dict[Path, str]:
    """Every generated file and its text, the chart's copies included."""
    files = {}
    for board in (training(), control()):
        files[Path("dashboards") / f"{board['uid']}.json"] = json.dumps(board, indent=2) + "\n"
    header = "# Generated by dashboards/generate.py: edit that file, then run it.\n"
    files[Path("dashboards") / "alerts.yaml"] = header + yaml.safe_dump(alerts(), sort_keys=False, width=120)
    for path, text in list(files.items()):
        if path.suffix == ".json":
            files[CHART_FILES.relative_to(ROOT) / "dashboards" / path.name] = text
    chart_header = (
        header + "# The chart's copy: templates/prometheusrule.yaml puts in its release for the placeholders.\n"
    )
    chart_rules = yaml.safe_dump(alerts(CHART_SCOPE), sort_keys=False, width=120)
    files[CHART_FILES.relative_to(ROOT) / "alerts.yaml"] = chart_header + chart_rules
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        target_path = ROOT / path
        if args.check:
            if not target_path.is_file() or target_path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            target_path.parent.mkdir(parents=True, exist_ok=True)
            target_path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date (run python dashboards/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
