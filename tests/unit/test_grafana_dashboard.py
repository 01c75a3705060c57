"""grafana/picoord.json asks only for series the coordinator exports: every query's metric
names are checked against a real scrape of a coordinator with Pi nodes and services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from picoord.common.node_series import FAMILIES, family_of
from picoord.coordinator.controller.controller import ServiceFigures
from picoord.coordinator.prometheus import MetricsExposition
from tests.promql import metric_names
from tests.unit.test_node_exporter_full import pi_cluster

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "picoord.json"


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            inner = (
                query.removeprefix("label_values(").rsplit(",", 1)[0]
                if query.startswith("label_values(")
                else query
            )
            found.append((f"variable {variable['name']}", inner))
    return found


@pytest.fixture
def exported(tmp_path: Path) -> set[str]:
    """Every sample name a coordinator with three Pis and two services serves."""
    figures = (
        ServiceFigures("mcp", 3, 3, 2, 4, "progressing"),
        ServiceFigures("postgres", 1, 1, 1, 1, "complete"),
    )
    exposition = MetricsExposition(pi_cluster(tmp_path), workloads=lambda: figures)
    exposition.render()
    scrape = exposition.scrape(timeout=0)
    assert scrape is not None
    return {
        sample.name
        for family in text_string_to_metric_families(scrape.body.decode())
        for sample in family.samples
    }


def test_every_query_reads_only_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    unknown = {where: sorted(metric_names(expr) - exported) for where, expr in queries(dashboard)}
    assert {where: names for where, names in unknown.items() if names} == {}
    assert all(metric_names(expr) for _, expr in queries(dashboard))  # the parser found something in each


def test_the_dashboard_covers_fleet_services_and_rollouts() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    assert {
        "node_cpu_seconds_total",
        "node_memory_MemAvailable_bytes",
        "node_thermal_zone_temp",
        "picoord_node_throttled",
        "picoord_service_replicas",
        "picoord_rollout_status",
        "picoord_rollout_revision",
    } <= used
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_node_series_the_dashboard_reads_is_in_the_table() -> None:
    """The node series come from common/node_series.py's table (the coordinator's own
    picoord_coordinator_, picoord_service_ and picoord_rollout_ series do not)."""
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    node = {name for name in used if name.startswith(("node_", "picoord_node_", "process_"))}
    assert node
    assert sorted(name for name in node if FAMILIES.get(name) is None and family_of(name) is None) == []
