"""The Grafana dashboards and the alert rules: generated from dashboards/generate.py (committed copies equal its
output), every metric they use exists in services/common/metrics.py and every metric there is on a panel, and
promtool checks the rules and runs their unit tests."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.common import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def load_generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return load_generator()


@pytest.fixture(scope="module")
def boards():
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


@pytest.fixture(scope="module")
def rules():
    return yaml.safe_load((DASHBOARDS / "alerts.yaml").read_text())["groups"][0]["rules"]


def panel_exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\batomo_[a-z0-9_]+", expr))


def resolve(name: str) -> str:
    """The metrics.py name behind a series name (histograms export _bucket, _count and _sum)."""
    defs = {d.name: d for d in metrics.ALL_METRICS}
    if name in defs:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and base in defs and defs[base].kind == "histogram":
            return base
    raise AssertionError(f"{name} is not a metric of services/common/metrics.py (or a histogram's series)")


def test_committed_files_are_the_generators_output(generator):
    for path, text in generator.render().items():
        committed = ROOT / path
        assert committed.is_file(), f"{path} is missing: run python dashboards/generate.py"
        assert committed.read_text(encoding="utf-8") == text, f"{path} is stale: run python dashboards/generate.py"
    shipped = {p.name for p in (ROOT / "charts/atomo/files/dashboards").glob("*.json")}
    assert shipped == {p.name for p in DASHBOARDS.glob("*.json")}, "the chart ships exactly dashboards/*.json"


def test_dashboard_model(boards):
    assert set(boards) == {"atomo-training", "atomo-control"}
    for uid, board in boards.items():
        assert board["uid"] == uid and board["schemaVersion"] >= 39 and board["title"]
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24
    training = {v["name"] for v in boards["atomo-training"]["templating"]["list"]}
    assert {"run", "codec"} <= training
    # Every panel and variable is scoped to the releases chosen: each selector of an atomo metric matches the
    # namespace and release variables (releases sharing a Prometheus never mix on a panel).
    for uid, board in boards.items():
        names = [v["name"] for v in board["templating"]["list"]]
        assert names[1:3] == ["namespace", "release"], uid
        queries = [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
        for expr in panel_exprs(board) + queries[2:]:  # after the namespace and release variables themselves
            for selector in re.findall(r"\batomo_[a-z0-9_]+(\{[^}]*\})?", expr):
                assert 'namespace=~"$namespace"' in selector and 'release=~"$release"' in selector, (uid, expr)
            assert re.search(r"\batomo_[a-z0-9_]+\{", expr), (uid, expr)
    # Every panel of the training dashboard that has run-labelled series filters by the variables.
    for expr in panel_exprs(boards["atomo-training"]):
        labelled = {resolve(n) for n in metric_names(expr)} & {d.name for d in metrics.ALL_METRICS if "run" in d.labels}
        if labelled:
            assert "$run" in expr and "$codec" in expr, expr


def test_latency_breakdown_covers_every_phase(boards):
    titles = {p["title"]: p for p in boards["atomo-training"]["panels"]}
    stacked = titles["Step time split: compute, encode, communication ($codec)"]
    assert stacked["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    # One stack per codec: the panel repeats for each codec chosen (each copy's $codec is that one codec), so
    # no stack adds up the phases of two codecs.
    assert stacked["repeat"] == "codec" and stacked["repeatDirection"] == "h"
    codec = {v["name"]: v for v in boards["atomo-training"]["templating"]["list"]}["codec"]
    assert codec["multi"] and codec["includeAll"]
    assert all('codec=~"$codec"' in t["expr"] and t["expr"].count("sum by (codec)") == 2 for t in stacked["targets"])
    quantile_metrics = set()
    for expr in panel_exprs(boards["atomo-training"]):
        if expr.startswith("histogram_quantile("):
            assert "by (codec, le)" in expr, expr
            quantile_metrics |= {resolve(n) for n in metric_names(expr)}
    phases = {"encode", "compute", "communication", "decode", "wait"}
    assert {n for n in quantile_metrics if n.rsplit("_", 2)[-2] in phases} == {
        f"atomo_worker_{p}_seconds" for p in ("encode", "compute", "communication")
    } | {f"atomo_ps_{p}_seconds" for p in ("decode", "wait")}
    for q in ("0.5", "0.95"):
        assert any(e.startswith(f"histogram_quantile({q},") for e in panel_exprs(boards["atomo-training"]))


def test_every_metric_used_exists_and_every_metric_is_on_a_panel(boards, rules):
    on_panels = set()
    for board in boards.values():
        for expr in panel_exprs(board):
            on_panels |= {resolve(n) for n in metric_names(expr)}
        for variable in board["templating"]["list"]:
            for name in metric_names(json.dumps(variable.get("query", ""))):
                resolve(name)
    for rule in rules:
        for name in metric_names(rule["expr"]):
            resolve(name)
    missing = {d.name for d in metrics.ALL_METRICS} - on_panels
    assert not missing, f"metrics on no panel (add one in dashboards/generate.py): {sorted(missing)}"


def test_alert_rules_cover_the_issue(rules):
    assert {r["alert"] for r in rules} == {
        "AtomoWorkerLost",
        "AtomoPSStalled",
        "AtomoHighDropRate",
        "AtomoRunFailed",
        "AtomoControlDown",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    tested = set(re.findall(r"alertname: (\w+)", (DASHBOARDS / "alerts_test.yaml").read_text()))
    assert tested == {r["alert"] for r in rules}, "every alert has a promtool unit test"


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run scripts/install-test-tools.sh")
    return path


def test_promtool_checks_the_rules(promtool):
    for rule_file in (DASHBOARDS / "alerts.yaml", ROOT / "charts/atomo/files/alerts.yaml"):
        result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS: 5 rules found" in result.stdout


def test_promtool_unit_tests_of_every_alert(promtool):
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"], cwd=DASHBOARDS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_the_charts_rules_alert_only_on_their_own_release(promtool, tmp_path):
    """The chart's PrometheusRule, rendered for release r1 in namespace ml, run by promtool on the series of two
    releases: r1's lost worker, drops and missing control service fire with r1's labels; r2's never fire."""
    from test_chart import template

    result = template(
        "--set", "monitoring.prometheusRule.enabled=true", "--namespace", "ml", "-s", "templates/prometheusrule.yaml"
    )
    assert result.returncode == 0, result.stderr
    rule = yaml.safe_load(result.stdout)
    assert rule["metadata"]["namespace"] == "ml"
    release = "atomo"  # test_chart renders release "atomo"
    for r in rule["spec"]["groups"][0]["rules"]:
        assert "RELEASE_NAME" not in r["expr"] and "RELEASE_NAMESPACE" not in r["expr"]
        assert f'namespace="ml", release="{release}"' in r["expr"], r["expr"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    mine, other = f'namespace="ml", release="{release}"', 'namespace="ml", release="r2"'
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "30s",
        "tests": [
            {
                "interval": "30s",
                "input_series": [
                    {"series": f'atomo_ps_workers{{{labels}, instance="ps", job="ps"}}', "values": "4x9 3x20"}
                    for labels in (mine, other)
                ]
                + [
                    {"series": f'atomo_control_runs{{{labels}, state="running", job="control"}}', "values": "1x30"}
                    for labels in (mine, other)
                ]
                + [
                    {"series": f'atomo_run_step{{{mine}, run="a", codec="svd", job="ps"}}', "values": "0+10x30"},
                    {"series": f'atomo_run_step{{{other}, run="b", codec="svd", job="ps"}}', "values": "0+10x30"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "7m",
                        "alertname": "AtomoWorkerLost",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": "ml",
                                    "release": release,
                                    "instance": "ps",
                                    "job": "ps",
                                },
                                "exp_annotations": {
                                    "summary": "A worker was lost during a run",
                                    "description": "1 fewer live workers than in the last 5 minutes while a run of "
                                    f"release {release} (namespace ml) is running (the run goes on while at least "
                                    "min_workers remain). A run that starts with fewer workers than the previous one "
                                    "also fires this for up to 5 minutes.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "7m", "alertname": "AtomoControlDown", "exp_alerts": []},
                ],
            },
            {  # only the other release's control service is scraped: this release's is down
                "interval": "1m",
                "input_series": [{"series": f'atomo_control_runs{{{other}, state="queued"}}', "values": "0x10"}],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "AtomoControlDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "namespace": "ml", "release": release},
                                "exp_annotations": {
                                    "summary": "The control service is down",
                                    "description": f"No atomo_control_runs series of release {release} (namespace "
                                    "ml) for 2 minutes: the control service is down or Prometheus no longer "
                                    "scrapes it.",
                                },
                            }
                        ],
                    }
                ],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
