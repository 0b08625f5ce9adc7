"""Tracing: the RequestTracer's spans from the end-of-request hook and the attempt events, in memory on a Clock;
the OTEL_* variables that switch it on; the exporters they name."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

pytest.importorskip("opentelemetry.sdk")  # the blyanproxy[otel] extra (.ci/run installs it)

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.web.test.requesthelper import DummyRequest  # noqa: E402

from blyanproxy.core import Node  # noqa: E402
from blyanproxy.forward import COMPLETE, TrafficRecorder  # noqa: E402
from blyanproxy.otelenv import tracing_requested  # noqa: E402
from blyanproxy.tracing import RequestTracer, span_exporters, tracer_provider  # noqa: E402

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
NODE_A = Node(id="a", name="gpu-a", base_url="http://10.0.0.1:8000")
NODE_B = Node(id="b", name="gpu-b", base_url="http://10.0.0.2:8001")


class Request(DummyRequest):
    def isSecure(self):
        return False


def arriving(uri=b"/v1/chat/completions?stream=1", headers=()):
    request = Request([])
    request.uri, request.method = uri, b"POST"
    request.content = io.BytesIO(b"{}")
    request.client = IPv4Address("TCP", "192.0.2.7", 40000)
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    return request


@pytest.fixture
def traced():
    """``(recorder, clock, exporter)``: a recorder whose tracer keeps its spans in memory."""
    clock = Clock()
    clock.advance(1_000)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = TrafficRecorder(clock)
    recorder.watch(RequestTracer(provider.get_tracer("test"), clock))
    return recorder, clock, exporter


def by_kind(exporter, kind):
    return [span for span in exporter.get_finished_spans() if span.kind == kind]


def test_a_request_that_fails_over_has_a_server_span_and_a_client_span_per_attempt(traced):
    recorder, clock, exporter = traced
    tally = recorder.begin(arriving(headers=[(b"traceparent", f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01".encode()),
                                             (b"tracestate", b"vendor=x")]))
    tally.attempt_started(NODE_A, 1)
    first_headers = dict(tally.node_headers)
    clock.advance(0.5)
    tally.attempt_failed("gpu-a", "refused")
    tally.attempt_started(NODE_B, 2)
    second_headers = dict(tally.node_headers)
    clock.advance(0.25)
    tally.node, tally.attempts = "gpu-b", 2
    tally.end(200, COMPLETE)

    [server] = by_kind(exporter, SpanKind.SERVER)
    first, second = sorted(by_kind(exporter, SpanKind.CLIENT), key=lambda span: span.attributes["blyan.attempt"])
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE  # the client's trace goes on
    assert f"{server.parent.span_id:016x}" == CLIENT_PARENT
    assert server.name == "POST" and server.status.status_code == StatusCode.UNSET
    assert dict(server.attributes) == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions", "client.address": "192.0.2.7",
        "blyan.request_id": tally.request_id, "http.response.status_code": 200, "blyan.node": "gpu-b",
        "blyan.attempts": 2, "blyan.ended": "complete", "http.request.body.size": 2, "http.response.body.size": 0,
    }
    assert (server.start_time, server.end_time) == (1_000 * 10**9, 1_000_750_000_000)
    for attempt in (first, second):
        assert attempt.parent.span_id == server.context.span_id and attempt.context.trace_id == server.context.trace_id
    assert first.attributes["blyan.node"] == "gpu-a" and first.attributes["server.address"] == "10.0.0.1"
    assert first.attributes["blyan.failover_reason"] == "refused" and first.status.status_code == StatusCode.ERROR
    assert (first.start_time, first.end_time) == (1_000 * 10**9, 1_000_500_000_000)
    assert second.attributes["http.response.status_code"] == 200 and second.attributes["server.port"] == 8001
    assert "blyan.failover_reason" not in second.attributes and second.status.status_code == StatusCode.UNSET
    # Each attempt's node gets that attempt's span as the parent, the client's tracestate kept.
    for headers, span in ((first_headers, first), (second_headers, second)):
        assert headers[b"traceparent"] == f"00-{CLIENT_TRACE}-{span.context.span_id:016x}-01".encode()
        assert headers[b"tracestate"] == b"vendor=x"
        assert headers[b"X-Request-Id"] == tally.request_id.encode()


def test_a_request_without_a_traceparent_starts_a_trace_and_a_failure_is_an_error(traced):
    recorder, _, exporter = traced
    tally = recorder.begin(arriving())
    tally.attempt_started(NODE_A, 1)
    traceparent = dict(tally.node_headers)[b"traceparent"]
    tally.attempt_failed("gpu-a", "response_timeout")
    tally.end(504, "timeout")
    [server] = by_kind(exporter, SpanKind.SERVER)
    [attempt] = by_kind(exporter, SpanKind.CLIENT)
    assert server.parent is None and server.status.status_code == StatusCode.ERROR
    assert traceparent.startswith(f"00-{server.context.trace_id:032x}-{attempt.context.span_id:016x}-".encode())
    assert attempt.attributes["error.type"] == "response_timeout"


def test_the_queue_wait_is_a_span_of_its_own(traced):
    recorder, clock, exporter = traced
    tally = recorder.begin(arriving())
    since = clock.seconds()
    clock.advance(2)
    tally.queue_waited(since)
    tally.end(503, "error")
    [queue] = [span for span in exporter.get_finished_spans() if span.name == "queue"]
    [server] = by_kind(exporter, SpanKind.SERVER)
    assert queue.parent.span_id == server.context.span_id
    assert queue.end_time - queue.start_time == 2 * 10**9


def test_the_proxys_own_endpoints_get_no_spans(traced):
    recorder, _, exporter = traced
    recorder.begin(arriving(uri=b"/health"), own_endpoint=True).end(200, COMPLETE)
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(("environ", "wanted"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "none, otlp"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
])
def test_the_otel_variables_switch_tracing_on(environ, wanted):
    assert tracing_requested(environ) is wanted


def test_the_exporters_are_the_ones_named():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    assert span_exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    kinds = [type(e) for e in span_exporters({"OTEL_TRACES_EXPORTER": "console,otlp"})]
    assert kinds == [ConsoleSpanExporter, OTLPSpanExporter]
    assert [type(e) for e in span_exporters({})] == [OTLPSpanExporter]  # otlp over HTTP is the default
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER: no span exporter named 'zipkin'"):
        span_exporters({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_the_service_name_is_blyan_proxy_unless_the_variables_say(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracer_provider({"OTEL_TRACES_EXPORTER": "none"}).resource.attributes["service.name"] == "blyan-proxy"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-proxy")
    assert tracer_provider({"OTEL_TRACES_EXPORTER": "none"}).resource.attributes["service.name"] == "edge-proxy"


#: Build a proxy in a fresh interpreter and tell which modules it imported.
BUILD = """
import json, sys
{block}
import attrs
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
logged = []
globalLogPublisher.addObserver(lambda event: logged.append(event.get("log_format") or ""))
from blyanproxy.config import Settings
from blyanproxy.tap import build_proxy
parts = build_proxy(attrs.evolve(Settings()), Clock(), persist=False, environ={environ!r})
print(json.dumps([[name for name in sys.modules if name.startswith(("opentelemetry", "blyanproxy.tracing"))],
                  logged]))
"""


def imported_after_building(environ, without_extra=False):
    block = "sys.modules['opentelemetry'] = None  # as if the extra were not installed" if without_extra else ""
    done = subprocess.run([sys.executable, "-c", BUILD.format(block=block, environ=environ)],
                          capture_output=True, text=True, timeout=60, check=True)
    imported, logged = json.loads(done.stdout.strip().splitlines()[-1])
    return imported, "\n".join(logged)


def test_without_the_otel_variables_nothing_of_opentelemetry_is_imported():
    imported, _ = imported_after_building({})
    assert imported == []


def test_without_the_extra_nothing_is_imported_and_the_log_says_so():
    imported, output = imported_after_building({"OTEL_TRACES_EXPORTER": "console"}, without_extra=True)
    assert imported == ["opentelemetry"]  # the None this test put there, to stand for a missing package
    assert "blyanproxy[otel] is not installed" in output


def test_with_the_extra_and_the_variables_the_tracer_is_built():
    imported, _ = imported_after_building({"OTEL_TRACES_EXPORTER": "none, console"})
    assert "blyanproxy.tracing" in imported and "opentelemetry.sdk.trace" in imported
