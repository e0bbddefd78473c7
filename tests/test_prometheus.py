"""A real Prometheus server scrapes a real PS and two workers during a run: the issue's metric names, labels
and values arrive (latency histograms, byte counters, run gauges)."""

import subprocess
import time

import httpx
import pytest

from services.common import metrics
from services.common.launch import LocalCluster, free_port

pytestmark = pytest.mark.slow

RUN = "prom"
STEPS = 60


def query(url: str, promql: str) -> list[dict]:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def value(url: str, promql: str) -> float:
    result = query(url, promql)
    assert len(result) == 1, (promql, result)
    return float(result[0]["value"][1])


def test_prometheus_scrapes_the_ps_and_workers(tmp_path, prometheus_binary):
    with LocalCluster(tmp_path / "state", workers=2, threads=1, worker_args=("--metrics-port", "0")) as cluster:
        cluster.client().call(
            "submit", run_id=RUN, spec={"model": "mlp", "steps": STEPS, "eval_every": 20, "codec": {"name": "svd"}}
        )
        cluster.wait_for_run(RUN, 120)
        workers = cluster.client().status()["workers"]
        targets = [f"127.0.0.1:{w['metrics_port']}" for w in workers]
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - {{job_name: ps, static_configs: [{{targets: ['127.0.0.1:{cluster.ready['metrics_port']}']}}]}}\n"
            f"  - {{job_name: worker, static_configs: [{{targets: {targets}}}]}}\n"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
            + [f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until every target has been scraped once
                try:
                    if len(query(url, "up == 1")) == 3:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            assert value(url, "count(up == 1)") == 3

            names = {d.name for d in metrics.WORKER_METRICS + metrics.PS_METRICS}
            seen = {s["metric"]["__name__"] for s in query(url, '{__name__=~"atomo_.*"}')}
            histograms = {d.name for d in metrics.WORKER_METRICS + metrics.PS_METRICS if d.kind == "histogram"}
            exported = {n if n not in histograms else n + "_count" for n in names}
            exported.discard("atomo_ps_dropped_messages_total")  # appears once something is dropped
            assert exported <= seen, exported - seen

            labels = query(url, f'atomo_worker_encode_seconds_count{{run="{RUN}"}}')
            assert {s["metric"]["worker"] for s in labels} == {"worker-0", "worker-1"}
            assert {s["metric"]["codec"] for s in labels} == {"svd"}
            assert value(url, f'sum(atomo_worker_encode_seconds_count{{run="{RUN}"}})') >= 2 * STEPS - 2
            assert value(url, f'atomo_ps_wait_seconds_count{{run="{RUN}"}}') == STEPS
            assert value(url, f'atomo_run_step{{run="{RUN}"}}') == STEPS
            assert value(url, f'atomo_run_test_accuracy{{run="{RUN}"}}') > 0.5
            assert value(url, f'atomo_run_compression_ratio{{run="{RUN}"}}') > 10
            sent = value(url, f'sum(atomo_worker_sent_bytes_total{{run="{RUN}"}})')
            received = value(url, f'atomo_ps_received_bytes_total{{run="{RUN}"}}')
            assert sent > 0 and abs(sent - received) / sent < 0.05
            assert value(url, "atomo_ps_workers") == 2
        finally:
            server.terminate()
            server.wait(10)
