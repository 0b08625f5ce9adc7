"""ProxyMetrics and /metrics: what a scrape shows after probes, requests, attempts and streams, read back
with prometheus_client's own text parser; the METRICS_TOKEN check."""

from __future__ import annotations

import json

import attrs
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.core import HealthRules, Node, NodeRegistry, after_loading, after_probe, after_traffic_failure
from blyanproxy.metrics import MAX_MODEL_LABELS, MetricsResource, ProxyMetrics

FAMILIES = {
    "blyan_requests", "blyan_time_to_first_byte_seconds", "blyan_request_duration_seconds",
    "blyan_response_bytes", "blyan_failed_attempts", "blyan_open_streams", "blyan_health_probes",
    "blyan_health_probe_duration_seconds", "blyan_workloads_api_calls", "blyan_workloads_cache_lookups",
    "blyan_workloads_cached_keys", "blyan_node_in_flight", "blyan_node_up", "blyan_node_usable",
    "blyan_node_ejected", "blyan_node_draining", "blyan_node_loading", "blyan_node_engine_info",
    "blyan_node_model_info", "blyan_node_engine_waiting", "blyan_node_engine_running",
    "blyan_node_engine_kv_cache_usage", "blyan_node_load_age_seconds",
}


@attrs.frozen
class Finished:
    """The fields of a finished request (an ``AccessRecord``) that the metrics read."""

    node: str | None
    status: int
    ended: str
    ttfb: float | None
    duration: float
    bytes_out: int
    model: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None


def node(index, **fields):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry():
    found = NodeRegistry()
    found.add(node(1))
    found.add(node(2))
    return found


@pytest.fixture
def metrics(registry, clock):
    return ProxyMetrics(registry, clock)


def scrape(metrics):
    """``{family name: family}`` of one scrape."""
    return {family.name: family for family in text_string_to_metric_families(metrics.render().decode())}


def value(families, sample_name, **labels):
    """The value of the one sample with this name and these labels (``None``: no such sample)."""
    family = sample_name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            family = sample_name[: -len(suffix)]
    found = [s.value for s in families[family].samples if s.name == sample_name and s.labels == labels]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_every_family_is_present_before_any_traffic(metrics):
    families = scrape(metrics)
    assert FAMILIES <= set(families)
    assert value(families, "blyan_open_streams", kind="sse") == 0
    assert value(families, "blyan_open_streams", kind="websocket") == 0
    assert value(families, "blyan_requests_total", node="node1", status_class="2xx", ended="complete") is None


def test_finished_requests_are_counted_by_node_status_class_and_ending(metrics):
    metrics.request_finished(Finished("node1", 200, "complete", 0.02, 1.5, 300))
    metrics.request_finished(Finished("node1", 201, "complete", 0.04, 0.5, 100))
    metrics.request_finished(Finished("node1", 200, "client_gone", None, 3.0, 10))
    metrics.request_finished(Finished(None, 503, "complete", None, 0.001, 90))
    families = scrape(metrics)
    assert value(families, "blyan_requests_total", node="node1", status_class="2xx", ended="complete") == 2
    assert value(families, "blyan_requests_total", node="node1", status_class="2xx", ended="client_gone") == 1
    assert value(families, "blyan_requests_total", node="-", status_class="5xx", ended="complete") == 1
    assert value(families, "blyan_time_to_first_byte_seconds_count", node="node1") == 2  # only with a first byte
    assert value(families, "blyan_time_to_first_byte_seconds_sum", node="node1") == pytest.approx(0.06)
    assert value(families, "blyan_time_to_first_byte_seconds_bucket", node="node1", le="0.025") == 1
    assert value(families, "blyan_time_to_first_byte_seconds_count", node="-") is None
    assert value(families, "blyan_request_duration_seconds_count", node="node1") == 3
    assert value(families, "blyan_request_duration_seconds_sum", node="node1") == pytest.approx(5.0)
    assert value(families, "blyan_request_duration_seconds_bucket", node="node1", le="1.0") == 1
    assert value(families, "blyan_response_bytes_total", node="node1") == 410
    assert value(families, "blyan_response_bytes_total", node="-") == 90


def test_failed_attempts_are_counted_by_node_and_reason(metrics):
    metrics.attempt_failed("node1", "refused")
    metrics.attempt_failed("node1", "refused")
    metrics.attempt_failed("node2", "timeout")
    families = scrape(metrics)
    assert value(families, "blyan_failed_attempts_total", node="node1", reason="refused") == 2
    assert value(families, "blyan_failed_attempts_total", node="node2", reason="timeout") == 1
    assert value(families, "blyan_failed_attempts_total", node="node2", reason="refused") is None


def test_open_streams_follow_opens_and_closes_by_kind(metrics):
    metrics.stream("sse", +1)
    metrics.stream("sse", +1)
    metrics.stream("websocket", +1)
    metrics.stream("sse", -1)
    families = scrape(metrics)
    assert value(families, "blyan_open_streams", kind="sse") == 1
    assert value(families, "blyan_open_streams", kind="websocket") == 1
    metrics.stream("websocket", -1)
    assert value(scrape(metrics), "blyan_open_streams", kind="websocket") == 0


def test_probes_are_counted_by_result_with_their_duration(metrics):
    metrics.probe("node1", True, 0.004)
    metrics.probe("node1", False, 2.0)
    metrics.probe("node2", True, 0.02)
    families = scrape(metrics)
    assert value(families, "blyan_health_probes_total", node="node1", result="pass") == 1
    assert value(families, "blyan_health_probes_total", node="node1", result="fail") == 1
    assert value(families, "blyan_health_probe_duration_seconds_count", node="node1") == 2
    assert value(families, "blyan_health_probe_duration_seconds_bucket", node="node1", le="0.005") == 1
    assert value(families, "blyan_health_probe_duration_seconds_sum", node="node2") == pytest.approx(0.02)


def test_workloads_calls_lookups_and_cached_keys(metrics):
    metrics.workloads_event("api", "ok")
    metrics.workloads_event("api", "refused")
    metrics.workloads_event("cache", "hit")
    metrics.workloads_event("cache", "hit")
    metrics.workloads_event("cache", "miss")
    metrics.cached_keys(4)
    families = scrape(metrics)
    assert value(families, "blyan_workloads_api_calls_total", outcome="ok") == 1
    assert value(families, "blyan_workloads_api_calls_total", outcome="refused") == 1
    assert value(families, "blyan_workloads_cache_lookups_total", result="hit") == 2
    assert value(families, "blyan_workloads_cache_lookups_total", result="miss") == 1
    assert value(families, "blyan_workloads_cached_keys") == 4


def test_node_gauges_are_read_from_the_registry_at_scrape_time(metrics, registry, clock):
    rules = HealthRules()
    registry.stats("n1").in_flight = 3
    first = registry.stats("n1")
    first.health = after_probe(first.health, True, clock.seconds(), rules)
    second = registry.stats("n2")
    second.health = after_traffic_failure(second.health, "refused", clock.seconds(), rules)
    families = scrape(metrics)
    gauges = ("blyan_node_in_flight", "blyan_node_up", "blyan_node_usable", "blyan_node_ejected",
              "blyan_node_draining")
    assert [value(families, name, node="node1") for name in gauges] == [3, 1, 1, 0, 0]
    assert [value(families, name, node="node2") for name in gauges] == [0, 0, 0, 1, 0]
    registry.update("n1", draining=True)
    registry.stats("n1").in_flight = 1
    registry.remove("n2")
    registry.add(node(3))
    families = scrape(metrics)
    assert [value(families, name, node="node1") for name in gauges] == [1, 1, 0, 0, 1]
    assert value(families, "blyan_node_up", node="node2") is None  # removed nodes leave the scrape
    assert value(families, "blyan_node_usable", node="node3") == 1


def test_the_engines_load_figures_and_their_age(metrics, registry, clock):
    from blyanproxy.core import LoadFigures

    registry.stats("n1").load = LoadFigures(waiting=3.0, running=7.0, kv_use=0.5, at=0.0)
    registry.stats("n2").load = LoadFigures(running=1.0, at=0.0)  # an engine that shows no queue
    clock.advance(2.5)
    families = scrape(metrics)
    names = ("blyan_node_engine_waiting", "blyan_node_engine_running", "blyan_node_engine_kv_cache_usage",
             "blyan_node_load_age_seconds")
    assert [value(families, name, node="node1") for name in names] == [3.0, 7.0, 0.5, 2.5]
    assert [value(families, name, node="node2") for name in names] == [None, 1.0, None, 2.5]


def test_a_worker_labels_every_sample_and_names_its_pid(registry, clock):
    metrics = ProxyMetrics(registry, clock, worker=2, pid=4242)
    metrics.request_finished(Finished("node1", 200, "complete", 0.01, 0.02, 5))
    families = scrape(metrics)
    samples = [sample for family in families.values() for sample in family.samples]
    assert samples and all(sample.labels.get("worker") == "2" for sample in samples)
    assert value(families, "blyan_worker_info", pid="4242", worker="2") == 1
    assert value(families, "blyan_node_up", node="node1", worker="2") == 0
    assert value(families, "blyan_requests_total", node="node1", status_class="2xx", ended="complete",
                 worker="2") == 1


def test_a_single_process_has_no_worker_label(metrics):
    samples = [sample for family in scrape(metrics).values() for sample in family.samples]
    assert "blyan_worker_info" not in scrape(metrics)
    assert not any("worker" in sample.labels for sample in samples)


# -- /metrics ------------------------------------------------------------------------------------

def get(resource, **headers):
    request = DummyRequest([b""])
    for name, header in headers.items():
        request.requestHeaders.setRawHeaders(name, [header])
    body = resource.render(request)
    if body is NOT_DONE_YET:
        body = b"".join(request.written)
    return request, body


def test_the_scrape_is_served_in_the_text_format(metrics):
    metrics.attempt_failed("node1", "refused")
    request, body = get(MetricsResource(metrics, None))
    assert request.responseHeaders.getRawHeaders(b"content-type") == [CONTENT_TYPE_LATEST.encode()]
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert value(families, "blyan_failed_attempts_total", node="node1", reason="refused") == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": b"Bearer wrong"},
                                     {"Authorization": b"Bearer scrape-token-012345678"},
                                     {"Authorization": b"Basic scrape-token-0123456789"}])
def test_with_a_token_a_scrape_without_it_is_401(metrics, headers):
    request, body = get(MetricsResource(metrics, "scrape-token-0123456789"), **headers)
    assert request.responseCode == 401 and json.loads(body)["code"] == "unauthorized"
    assert b"blyan_" not in body


def test_with_a_token_a_scrape_carrying_it_is_served(metrics):
    request, body = get(MetricsResource(metrics, "scrape-token-0123456789"),
                        Authorization=b"Bearer scrape-token-0123456789")
    assert request.responseCode in (None, 200) and b"blyan_node_up" in body


def test_engine_models_and_loading_are_shown_with_bounded_labels(metrics, registry, clock):
    registry.add(node(3, engine="vllm", models=tuple(f"m{i}" for i in range(40))))
    first = registry.stats("n1")
    first.engine, first.models = "llamacpp", ("smol",)
    first.health = after_loading(first.health, clock.seconds())
    families = scrape(metrics)
    assert value(families, "blyan_node_loading", node="node1") == 1
    assert value(families, "blyan_node_engine_info", node="node1", engine="llamacpp") == 1
    assert value(families, "blyan_node_engine_info", node="node2", engine="unknown") == 1
    assert value(families, "blyan_node_engine_info", node="node3", engine="vllm") == 1
    assert value(families, "blyan_node_model_info", node="node1", model="smol") == 1
    shown = [sample for sample in families["blyan_node_model_info"].samples if sample.labels["node"] == "node3"]
    assert len(shown) == MAX_MODEL_LABELS
