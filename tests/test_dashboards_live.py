"""Every PromQL expression of the dashboards and the alert rules returns data from a real Prometheus that scraped
a real local cluster (a PS, two workers and the control service) during a short run submitted over REST.

What the run produces for real, so that no panel is empty: a 503 from the control service's /readyz (asked
before its PS is up: the 5xx panels), one malformed message on the PS's worker port from a raw ZeroMQ DEALER
(the dropped-messages panel and the drop-rate alert), and a run that ends while Prometheus scrapes (the
run-duration histogram).

Prometheus scrapes the four processes with the target labels the chart's ServiceMonitor adds (`namespace`,
`release`), which the dashboards' first variables and every selector use.

The rule for each kind of expression:
- a panel target: a range query over the test's window, with the dashboard variables substituted as Grafana
  does ($run and $codec by the values their own variable queries return, $__rate_interval as Grafana computes
  it for a 1 s scrape interval, $__interval the query step, $__range the window); it returns at least one series
  with at least one finite value;
- a template variable query `label_values(SELECTOR, LABEL)`: /api/v1/label/LABEL/values with match[]=SELECTOR
  ($run substituted) returns at least one value, and $run's values include the run that was submitted;
- an alert rule: its expression evaluates without error (a quiet alert returns nothing, as it should in a
  healthy run), and every metric selector in it, taken out of the expression, returns at least one series.

No exemptions.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
import zmq
from helpers import wait_until

from services.common.launch import LocalCluster, free_port
from services.control.client import Client
from services.control.launchers import ControlProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
TOKEN = "live-dashboards"
SCRAPE_S = 1
STEP_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"  # Grafana: max($__interval + scrape interval, 4 x scrape interval)
SPEC = {
    "model": "mlp",
    "dataset": "digits",
    "workers": 2,
    "batch_size": 32,
    "steps": 150,
    "eval_every": 50,
    "checkpoint_every": 1000,
    "codec": {"name": "svd"},
}
RELEASE_LABELS = {"namespace": "atomo-live", "release": "live"}
SELECTOR = re.compile(r"\batomo_[a-z0-9_]+(?:\{[^}]*\})?")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")


class Prometheus:
    """A Prometheus server on loopback with its own TSDB; `query`, `query_range` and `label_values` fail the
    test on an API error."""

    def __init__(self, binary: str, tmp: Path, targets: dict[str, list[str]]):
        config = tmp / "prometheus.yml"
        # The target labels the chart's ServiceMonitor gives every series: the namespace and the release.
        scope = json.dumps(RELEASE_LABELS)
        jobs = "".join(
            f"  - {{job_name: {job}, static_configs: [{{targets: {json.dumps(addrs)}, labels: {scope}}}]}}\n"
            for job, addrs in targets.items()
        )
        config.write_text(
            f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\nscrape_configs:\n{jobs}"
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}"]
            + [f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def api(self, path: str, **params) -> list | dict:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert reply["status"] == "success", (path, params, reply)
        return reply["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def query_range(self, promql: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=promql, start=start, end=end, step=STEP_S)["result"]

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match, "start": start, "end": end})

    def up(self) -> int:
        try:
            return len(self.query("up == 1"))
        except httpx.HTTPError:
            return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def grafana_escape(value: str) -> str:
    """A variable's value in a regex matcher as Grafana writes it: regex metacharacters escaped, the escaping
    backslash doubled for the PromQL string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def finite_points(result: list[dict]) -> int:
    return sum(math.isfinite(float(v)) for series in result for _, v in series["values"])


def send_malformed_message(port: int) -> None:
    """One message the PS cannot parse, from a raw DEALER on its worker port: dropped as bad_header."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"garbage")
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(b"\x00 not a header")
        sock.close()
    finally:
        ctx.term()


def test_every_dashboard_and_rule_expression_returns_data(tmp_path, prometheus_binary):
    boards = {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}
    rules = yaml.safe_load((DASHBOARDS / "alerts.yaml").read_text())["groups"][0]["rules"]
    cluster = LocalCluster(tmp_path / "state", workers=2, threads=1)
    cluster.control_port = free_port()  # known before the PS starts: the control service is started first
    control = ControlProcess(
        tmp_path / "control.db",
        f"tcp://127.0.0.1:{cluster.control_port}",
        TOKEN,
        extra_args=("--poll-interval", "0.2"),
        log_path=tmp_path / "control.log",
    )
    prometheus = None
    try:
        control.start()
        # No PS yet: a real 503, so the 5xx panels of the control dashboard have a series.
        assert httpx.get(f"{control.url}/readyz", timeout=5).status_code == 503
        targets = {
            "ps": [f"127.0.0.1:{cluster.metrics_ports['ps']}"],
            "worker": [f"127.0.0.1:{p}" for name, p in cluster.metrics_ports.items() if name != "ps"],
            "control": [f"127.0.0.1:{control.port}"],
        }
        prometheus = Prometheus(prometheus_binary, tmp_path, targets)
        start = time.time()
        cluster.start()
        wait_until(lambda: prometheus.up() == 4, 60, "Prometheus scraping all four targets", 0.5)
        with Client(control.url, TOKEN) as api:
            wait_until(api.ready, 30, "the control service reaching the PS", 0.2)
            run_id = api.submit(SPEC)["id"]
            wait_until(lambda: (api.run(run_id)["step"] or 0) >= 10, 60, "the run's first steps", 0.2)
            send_malformed_message(cluster.port)
            final = ("succeeded", "failed", "cancelled")
            run = wait_until(lambda: (r := api.run(run_id))["state"] in final and r, 90, "the run's end", 0.2)
            assert run["state"] == "succeeded", run
        # Two scrapes at least after the run ended and after the drop: every rate() window has its samples.
        wait_until(
            lambda: (
                prometheus.query("atomo_control_run_duration_seconds_count > 0")
                and prometheus.query('count_over_time(atomo_ps_dropped_messages_total{reason="bad_header"}[1m]) >= 2')
            ),
            30,
            "Prometheus seeing the finished run and the dropped message",
            0.5,
        )
        time.sleep(2 * SCRAPE_S)
        end = time.time()
        window = f"{math.ceil(end - start)}s"

        # Template variables, resolved in order as Grafana does: $run first, then $codec given $run.
        values, found = {}, {}
        checked = 0
        for board in boards.values():
            for variable in board["templating"]["list"]:
                if variable["type"] != "query":
                    continue
                metric, label = LABEL_VALUES.match(variable["query"]["query"]).groups()
                for name, regex in values.items():
                    metric = metric.replace(f"${name}", regex)
                result = prometheus.label_values(label, metric, start, end)
                assert result, f"{board['uid']} variable {variable['name']}: {variable['query']['query']} is empty"
                found[variable["name"]] = result
                values[variable["name"]] = "|".join(grafana_escape(v) for v in result)
                checked += 1
        assert run_id in found["run"] and found["codec"] == ["svd"]
        assert found["namespace"] == ["atomo-live"] and found["release"] == ["live"]

        def substitute(expr: str) -> str:
            for name, regex in values.items():
                expr = expr.replace(f"${name}", regex)
            expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", f"{STEP_S}s")
            expr = expr.replace("$__range", window)
            assert "$" not in expr, f"an unsubstituted variable in {expr}"
            return expr

        empty = []
        for board in boards.values():
            for panel in board["panels"]:
                for target in panel.get("targets", []):
                    expr = substitute(target["expr"])
                    if not finite_points(prometheus.query_range(expr, start, end)):
                        empty.append(f"{board['uid']} / {panel['title']} / {target['refId']}: {expr}")
                    checked += 1
        for rule in rules:
            prometheus.query(rule["expr"])  # parses and evaluates (a quiet alert returns nothing)
            selectors = SELECTOR.findall(rule["expr"])
            assert selectors, rule["expr"]
            for selector in selectors:
                if not prometheus.query(selector):
                    empty.append(f"alert {rule['alert']}: the selector {selector} has no series")
            checked += 1
        assert not empty, "expressions without data:\n" + "\n".join(empty)
        took = (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])).total_seconds()
        print(f"{checked} dashboard and rule expressions return data (a {took:.1f} s run, a {window} window)")
        assert checked >= 30
    finally:
        if prometheus is not None:
            prometheus.stop()
        control.stop()
        cluster.stop()
