"""deploy/grafana: provisioning points at the dashboard, every panel's PromQL parses and uses documented metrics.

The queries are run for real against Prometheus in test_observability_prometheus.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "apserve.json"
NEEDED_PANELS = {
    "Request rate by bits",
    "Latency p50 / p99 against the SLO",
    "Queue depth",
    "Bits mix over time",
    "Served accuracy over time",
    "Power against budget",
    "Rejections by reason",
    "Batch size by bits",
}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def metric_names(node: Any) -> set[str]:
    """Metric names a parsed PromQL expression selects."""
    if isinstance(node, promql_parser.VectorSelector):
        return {node.name} if node.name else set()
    if isinstance(node, promql_parser.MatrixSelector):
        return metric_names(node.vector_selector)
    if isinstance(node, promql_parser.BinaryExpr):
        return metric_names(node.lhs) | metric_names(node.rhs)
    if isinstance(node, promql_parser.AggregateExpr):
        return metric_names(node.expr) | (metric_names(node.param) if node.param is not None else set())
    if isinstance(node, promql_parser.Call):
        return set().union(*(metric_names(a) for a in node.args))
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return metric_names(node.expr)
    return set()


def documented_metrics() -> set[str]:
    """Series names from the metrics table in docs/INTERNALS.md (histograms expand to _bucket/_sum/_count)."""
    text = (ROOT / "docs" / "INTERNALS.md").read_text()
    table = text[text.index("## Metrics") :]
    names = set()
    for name, kind in re.findall(r"^\| `(\w+)` \| (\w+)", table, flags=re.M):
        base = f"apserve_{name}"
        names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"} if kind == "histogram" else {base}
    # and the process collector's series the section names (process_cpu_seconds_total, ...)
    names |= set(re.findall(r"`(process_\w+)`", table))
    return names


def substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "4s").replace("$__interval", "1s").replace("$__range", "60s")


def test_datasource_has_a_fixed_uid_that_every_panel_uses() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    assert uids == {"apserve-prometheus"}
    dashboard = json.loads(DASHBOARD.read_text())
    assert "${DS" not in DASHBOARD.read_text()
    for panel in panels(dashboard):
        for target in [panel, *panel.get("targets", [])]:
            if "datasource" in target:
                assert target["datasource"] == {"type": "prometheus", "uid": "apserve-prometheus"}, panel["title"]


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "apserve.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in panels(dashboard)}
    assert titles >= NEEDED_PANELS, NEEDED_PANELS - titles
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36


def test_every_query_parses_and_uses_documented_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = documented_metrics()
    assert "apserve_request_duration_seconds_bucket" in known and "apserve_queue_depth" in known
    count = 0
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            names = metric_names(promql_parser.parse(substitute(expr)))
            assert names, f"{panel['title']}: {expr} selects no metric"
            assert names <= known, f"{panel['title']}: {sorted(names - known)} not in docs/INTERNALS.md"
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, f"{panel['title']}: rate windows must follow the scrape interval"
            count += 1
    assert count >= len(NEEDED_PANELS)


def test_parser_rejects_broken_promql() -> None:
    """The parse check above can fail."""
    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse(substitute("sum(rate(apserve_requests_total[$__rate_interval])"))
