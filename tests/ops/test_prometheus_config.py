"""Prometheus configuration, alert rules and the Grafana dashboard, checked offline.

promtool validates syntax and runs the rules' unit tests; the PromQL scanner checks that
every query names only metrics that ServerMetrics exports (or rules record).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from server.metrics import ServerMetrics

from .conftest import DEPLOY
from .promql import metric_names, substitute_grafana_variables

RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "switchboard.json"
# Series that Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def run_promtool(promtool: str, *args: str) -> str:
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def exported_names() -> frozenset[str]:
    return ServerMetrics().metric_names()


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = [
        (panel["title"], target["expr"])
        for panel in dash["panels"]
        for target in panel.get("targets", [])
    ]
    for var in dash["templating"]["list"]:
        # label_values(SELECTOR, LABEL) -> SELECTOR, a PromQL expression.
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["query"]["query"])
        assert m, f"variable {var['name']}: unexpected query {var['query']['query']!r}"
        out.append((f"variable {var['name']}", m.group(1)))
    return [(title, substitute_grafana_variables(expr)) for title, expr in out]


def test_promtool_check_rules(promtool):
    out = run_promtool(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_promtool_unit_tests_of_the_alerts(promtool):
    run_promtool(promtool, "test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml"))


def test_promtool_check_config(promtool):
    out = run_promtool(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "1 rule files found" in out


def test_alerts_cover_errors_latency_queue_and_down():
    alerts = {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}
    for name in (
        "SwitchboardDown",
        "SwitchboardHighErrorRate",
        "SwitchboardHighTimeToFirstToken",
        "SwitchboardHighInterTokenLatency",
        "SwitchboardQueueSaturated",
        "SwitchboardRejectingRequests",
        "SwitchboardAdapterSlotsExhausted",
        "SwitchboardApiKeyAtConcurrencyLimit",
    ):
        assert name in alerts, f"missing alert {name}"
        assert alerts[name]["labels"]["severity"] in {"critical", "warning", "info"}
        assert alerts[name]["annotations"]["summary"]


def test_rules_use_only_exported_metrics():
    known = exported_names() | recorded_names() | PROMETHEUS_SERIES
    for group in rule_groups():
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('alert') or rule['record']} uses {unknown}"


def test_scrape_config_targets_the_metrics_port():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "switchboard")
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["port"] == 9400


def test_dashboard_panels_use_only_exported_metrics():
    known = exported_names() | recorded_names() | PROMETHEUS_SERIES
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        unknown = metric_names(expr) - known
        assert not unknown, f"panel {title!r} uses unknown metrics {unknown}"


def test_dashboard_queries_are_valid_promql(promtool, tmp_path: Path):
    """promtool parses each panel query as a recording rule."""
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def test_dashboard_layout_and_topics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "switchboard"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "prometheus", p["title"]
            assert p["targets"], p["title"]
    used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    for topic in (
        "switchboard_requests_total",  # throughput and errors by code
        "switchboard_generated_tokens_total",
        "switchboard_time_to_first_token_seconds_bucket",
        "switchboard_inter_token_latency_seconds_bucket",
        "switchboard_request_duration_seconds_bucket",
        "switchboard_requests_waiting",
        "switchboard_queue_wait_seconds_bucket",
        "switchboard_batch_size_sum",
        "switchboard_adapters_resident",
        "switchboard_adapter_loads_total",
        "switchboard_adapter_evictions_total",
        "switchboard_kv_cache_usage_ratio",
    ):
        assert topic in used, f"dashboard has no panel on {topic}"


def test_grafana_provisioning_matches_dashboard_and_compose():
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((prov / "dashboards" / "switchboard.yml").read_text())
    (provider,) = boards["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
