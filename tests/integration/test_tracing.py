"""Tracing over real sockets: a proxy failing over between two nodes records its spans in memory, and the
node that answers receives the trace context and request id of its attempt."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq

pytest.importorskip("opentelemetry.sdk")  # the blyanproxy[otel] extra (.ci/run installs it)

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from blyanproxy.tracing import RequestTracer  # noqa: E402

from .test_forwarding import closed_port_url  # noqa: E402

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest_twisted.ensureDeferred
async def test_spans_of_a_failed_over_request_and_the_context_the_node_receives(reactor, devnode_factory,
                                                                                  proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([closed_port_url(), node.url])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    proxy.parts.recorder.watch(RequestTracer(provider.get_tracer("test"), reactor))

    response = await treq.post(proxy.url + "/_devnode/echo?x=1", data=b"hello", timeout=10, headers={
        "traceparent": f"00-{CLIENT_TRACE}-b7ad6b7169203331-01", "tracestate": "congo=t61rcWkgMzE",
        "X-Request-Id": "trace-test-1"})
    echo = json.loads(await response.content())
    assert response.code == 200 and response.headers.getRawHeaders("X-Request-Id") == ["trace-test-1"]

    [server] = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    attempts = sorted((span for span in exporter.get_finished_spans() if span.kind == SpanKind.CLIENT),
                      key=lambda span: span.attributes["blyan.attempt"])
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE
    assert server.attributes["http.response.status_code"] == 200 and server.attributes["blyan.attempts"] == 2
    assert server.attributes["blyan.request_id"] == "trace-test-1" and server.attributes["url.path"] == "/_devnode/echo"
    assert [span.attributes["blyan.node"] for span in attempts] == ["node0", "node1"]
    assert attempts[0].attributes["blyan.failover_reason"] == "refused"
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[1].status.status_code == StatusCode.UNSET

    seen = {}
    for name, value in echo["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    assert seen["traceparent"] == [f"00-{CLIENT_TRACE}-{attempts[1].context.span_id:016x}-01"]
    assert seen["tracestate"] == ["congo=t61rcWkgMzE"]
    assert seen["x-request-id"] == ["trace-test-1"]
