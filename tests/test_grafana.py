"""The Grafana dashboard (etc/grafana/blyan-proxy.json) asks only for what the proxy exports: every metric name in
every expression is a sample name of a scrape, and every label it matches or groups by is one of that metric's
labels (or a label Prometheus adds to a target)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from blyanproxy.core import Node, NodeRegistry
from blyanproxy.metrics import ProxyMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "etc" / "grafana" / "blyan-proxy.json"
#: Labels Prometheus puts on every series it scrapes from a target.
TARGET_LABELS = {"instance", "job"}

_METRIC = re.compile(r"\b(blyan_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")


@attrs.frozen
class Finished:
    """A finished request as the metrics read it (forward's ``AccessRecord``)."""

    node: str | None = "node1"
    status: int = 200
    ended: str = "complete"
    ttfb: float | None = 0.05
    duration: float = 1.0
    bytes_out: int = 100
    model: str | None = "llama"
    tokens_in: int | None = 3
    tokens_out: int | None = 5


def exported_labels() -> dict[str, set[str]]:
    """``{sample name: its label names}`` of a scrape of a worker's metrics once every family has samples."""
    registry = NodeRegistry()
    registry.add(Node(id="n1", name="node1", base_url="http://10.0.0.1:8000"))
    metrics = ProxyMetrics(registry, Clock(), worker=1, pid=4242)
    metrics.request_finished(Finished())
    metrics.attempt_failed("node1", "refused")
    metrics.stream("sse", 1)
    metrics.probe("node1", True, 0.01)
    metrics.workloads_event("api", "ok")
    metrics.workloads_event("cache", "hit")
    metrics.cached_keys(1)
    metrics.queue_left(0.5, "served")
    metrics.queue_rejected("queue_full")
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


EXPORTED = exported_labels()


def panels(container: dict):
    """Every panel of the dashboard, those inside rows too."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def expressions() -> list[str]:
    """Every PromQL expression: the panels' targets and the query variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def named_metrics(expression: str) -> list[tuple[str, set[str]]]:
    """``(metric name, label names its selector matches)`` for each ``blyan_`` metric an expression names."""
    return [(name, set(_MATCHER.findall(selector or ""))) for name, selector in _METRIC.findall(expression)]


def test_exported_names_include_the_suffixed_samples():
    for name in ("blyan_requests_total", "blyan_time_to_first_byte_seconds_bucket",
                 "blyan_request_duration_seconds_count", "blyan_node_in_flight", "blyan_worker_info"):
        assert name in EXPORTED
    assert {"node", "status_class", "ended", "worker"} <= EXPORTED["blyan_requests_total"]
    assert "le" in EXPORTED["blyan_time_to_first_byte_seconds_bucket"]


def test_the_dashboard_has_expressions():
    assert len(expressions()) >= 20


@pytest.mark.parametrize("expression", expressions())
def test_every_metric_an_expression_names_is_exported_with_the_labels_it_uses(expression):
    label_values = _LABEL_VALUES.match(expression)
    if label_values:
        expression, grouped = label_values.group(1), {label_values.group(2)}
    else:
        grouped = {label.strip() for group in _GROUPING.findall(expression) for label in group.split(",")} - {""}
    metrics = named_metrics(expression)
    assert metrics, "the expression names no blyan_ metric"
    available = set(TARGET_LABELS)
    for name, matched in metrics:
        assert name in EXPORTED, f"{name} is not exported"
        unknown = matched - EXPORTED[name] - TARGET_LABELS
        assert not unknown, f"{name} has no label {unknown}"
        available |= EXPORTED[name]
    assert grouped <= available, f"grouped by a label no metric here has: {grouped - available}"


def test_every_panel_reads_the_chosen_data_source_and_has_its_own_id():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(target["datasource"] == panel["datasource"] for target in panel["targets"])
    names = [variable["name"] for variable in dashboard["templating"]["list"]]
    assert names == ["datasource", "instance", "node"]


def test_every_panel_aggregates_across_workers():
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            assert re.match(r"(sum|max|count|histogram_quantile)\b", target["expr"]), target["expr"]
            assert "worker" not in target["expr"] + target.get("legendFormat", "")
