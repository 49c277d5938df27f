"""deploy/ files: every PromQL expression names only series that ServerMetrics really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deepserve.server.metrics import ServerMetrics

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "deepserve-dashboard.json"
NAME = re.compile(r"deepserve:[a-z0-9_:]+")  # digits too: e2e_request_latency_seconds


def exposed_series() -> set[str]:
    """Sample names in the rendered exposition (counters *_total, histograms *_bucket/_sum/_count)."""
    body, _ = ServerMetrics("m").render()
    return {line.split("{")[0].split()[0] for line in body.decode().splitlines() if line and line[0] != "#"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    dash = dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def check_names(expr: str, exposed: set[str]) -> None:
    names = NAME.findall(expr)
    unknown = [n for n in names if n not in exposed]
    assert not unknown, f"{unknown} not exposed by ServerMetrics (in {expr!r})"


def check_balanced(expr: str) -> None:
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for ch in expr:
        if ch in depth:
            depth[ch] += 1
        elif ch in closing:
            depth[closing[ch]] -= 1
            assert depth[closing[ch]] >= 0, expr
    assert not any(depth.values()), expr


def test_dashboard_exprs_name_only_exposed_series():
    exposed = exposed_series()
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        check_names(expr, exposed)
        check_balanced(expr)


def test_alert_exprs_name_only_exposed_series():
    exposed = exposed_series()
    rules = alert_rules()
    assert len(rules) >= 4
    for rule in rules:
        check_names(rule["expr"], exposed)
        check_balanced(rule["expr"])
        assert rule["alert"] and rule["annotations"]["summary"]


def test_dashboard_plots_every_exposed_metric():
    used = {n for expr in dashboard_exprs() for n in NAME.findall(expr)}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed_series()}
    plotted = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= plotted, families - plotted


def test_histograms_have_p50_p90_p99_panels():
    exprs = dashboard_exprs()
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert any(f"histogram_quantile({q}," in e and f"deepserve:{hist}_bucket" in e for e in exprs), (hist, q)


def test_dashboard_datasource_is_a_template_variable():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrapes_loopback_metrics_and_loads_alerts():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "deepserve"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert "alerts.yml" in doc["rule_files"]
