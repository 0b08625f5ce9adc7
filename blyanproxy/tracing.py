"""OpenTelemetry tracing of the requests forwarded to nodes: the ``blyanproxy[otel]`` extra.

Imported only when that extra is installed and the ``OTEL_*`` variables ask
for spans (``tap.request_tracer`` decides); without it nothing of
OpenTelemetry is imported. ``RequestTracer`` is a ``forward.RequestWatcher``:
it hears each request through the end-of-request hook and the attempt events
of ``Failover``, never from inside the data path, and records

- a server span per request (``SpanKind.SERVER``), the child of the client's
  ``traceparent`` when it sent one, with the method, path (no query), status,
  node, attempts, how it ended and the request id;
- a client span per attempt (``SpanKind.CLIENT``): the node, its address, the
  attempt's number, and for an attempt that failed the reason the request
  failed over (``blyan.failover_reason``, ``error.type``), with an error status;
  its W3C ``traceparent`` (and ``tracestate``) is sent to the node;
- a ``queue`` span for the time a request waited for admission
  (``RequestTally.queue_waited``: the hook an admission queue calls).

``tracer_provider`` builds the SDK's provider from the standard variables:
``OTEL_SERVICE_NAME`` (default ``blyan-proxy``) and ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` (read by the SDK), ``OTEL_TRACES_EXPORTER``
(``otlp``, the default, over ``OTEL_EXPORTER_OTLP_PROTOCOL`` ``http/protobuf``
or ``grpc``; ``console``; ``none``; or any installed exporter's name) and the
exporter's own ``OTEL_EXPORTER_OTLP_*`` variables. ``OTEL_PROPAGATORS`` chooses
the propagators (default W3C trace context and baggage).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points

import attrs
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from twisted.internet.interfaces import IReactorTime

from blyanproxy.core import Node
from blyanproxy.forward import FAILED_ENDINGS, AccessRecord, RequestTally

#: The name spans are recorded under.
INSTRUMENTATION = "blyanproxy"
#: The service name when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` gives one.
DEFAULT_SERVICE_NAME = "blyan-proxy"
_EXPORTERS = "opentelemetry_traces_exporter"


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _text_headers(headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> dict[str, list[str]]:
    """Raw headers as the propagators read them: lower-case names, text values."""
    found: dict[str, list[str]] = {}
    for name, values in headers:
        found.setdefault(name.decode("latin-1").lower(), []).extend(v.decode("latin-1") for v in values)
    return found


@attrs.define
class _Spans:
    """One request's open spans."""

    server: Span
    attempt: Span | None = None


class RequestTracer:
    """Spans for the requests forwarded to nodes (a ``forward.RequestWatcher``; see the module docstring).

    ``tracer`` records them; ``clock`` (the reactor) stamps them, as the
    request's tally is stamped.
    """

    def __init__(self, tracer: trace.Tracer, clock: IReactorTime) -> None:
        self._tracer = tracer
        self._clock = clock
        self._open: weakref.WeakKeyDictionary[RequestTally, _Spans] = weakref.WeakKeyDictionary()

    def began(self, tally: RequestTally, headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> None:
        """Open the request's server span, under the client's trace when it sent one."""
        parent = propagate.extract(_text_headers(headers))
        span = self._tracer.start_span(
            tally.method, context=parent, kind=SpanKind.SERVER, start_time=_nanoseconds(tally.started),
            attributes={
                "http.request.method": tally.method,
                "url.path": tally.target.partition(b"?")[0].decode("latin-1"),
                "client.address": tally.client.origin,
                "blyan.request_id": tally.request_id,
            },
        )
        self._open[tally] = _Spans(span)

    def attempt_started(self, tally: RequestTally, node: Node, number: int) -> Sequence[tuple[bytes, bytes]]:
        """Open the attempt's client span; its ``traceparent`` (and ``tracestate``) for the node."""
        spans = self._open.get(tally)
        if spans is None:
            return ()
        self._end_attempt(spans)
        url = node.url
        span = self._tracer.start_span(
            tally.method, context=trace.set_span_in_context(spans.server), kind=SpanKind.CLIENT,
            start_time=_nanoseconds(self._clock.seconds()),
            attributes={
                "http.request.method": tally.method,
                "server.address": url.host,
                "server.port": url.port,
                "blyan.node": node.name,
                "blyan.attempt": number,
            },
        )
        spans.attempt = span
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in carrier.items()]

    def attempt_failed(self, tally: RequestTally, node: str, reason: str) -> None:
        """End the attempt's span as failed, with the reason the request fails over (or gives up)."""
        spans = self._open.get(tally)
        if spans is None or spans.attempt is None:
            return
        spans.attempt.set_attributes({"blyan.failover_reason": reason, "error.type": reason})
        spans.attempt.set_status(Status(StatusCode.ERROR, reason))
        self._end_attempt(spans)

    def queue_waited(self, tally: RequestTally, since: float, until: float) -> None:
        """Record the request's wait for admission as a ``queue`` span."""
        spans = self._open.get(tally)
        if spans is None:
            return
        span = self._tracer.start_span("queue", context=trace.set_span_in_context(spans.server),
                                       start_time=_nanoseconds(since))
        span.end(end_time=_nanoseconds(until))

    def ended(self, tally: RequestTally, record: AccessRecord) -> None:
        """End the request's spans: the last attempt's with the answer's status, then the server span."""
        spans = self._open.pop(tally, None)
        if spans is None:
            return
        failed = record.ended in FAILED_ENDINGS or record.status >= 500
        if spans.attempt is not None:
            spans.attempt.set_attribute("http.response.status_code", record.status)
            if failed:
                spans.attempt.set_status(Status(StatusCode.ERROR, record.ended))
            self._end_attempt(spans)
        server = spans.server
        server.set_attributes({
            "http.response.status_code": record.status,
            "blyan.node": record.node or "",
            "blyan.attempts": record.attempts,
            "blyan.ended": record.ended,
            "http.request.body.size": record.bytes_in,
            "http.response.body.size": record.bytes_out,
        })
        if failed:
            server.set_status(Status(StatusCode.ERROR, record.ended))
        server.end(end_time=_nanoseconds(record.duration + tally.started))

    def _end_attempt(self, spans: _Spans) -> None:
        if spans.attempt is not None:
            spans.attempt.end(end_time=_nanoseconds(self._clock.seconds()))
            spans.attempt = None


def span_exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (comma-separated; ``ValueError`` for one not installed)."""
    exporters: list[SpanExporter] = []
    for name in (part.strip() for part in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")):
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
            name = "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"
        try:
            found = [point for point in entry_points(group=_EXPORTERS) if point.name == name]
        except TypeError:  # Python 3.9: entry_points() takes no selection
            found = [point for point in entry_points().get(_EXPORTERS, ()) if point.name == name]
        if not found:
            raise ValueError(f"OTEL_TRACES_EXPORTER: no span exporter named {name!r} is installed")
        exporters.append(found[0].load()())
    return exporters


def tracer_provider(environ: Mapping[str, str]) -> TracerProvider:
    """The SDK's provider for the ``OTEL_*`` variables in ``environ`` (see the module docstring)."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in span_exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def request_tracer(environ: Mapping[str, str], clock: IReactorTime) -> RequestTracer:
    """The tracer of this process's requests, exporting as the ``OTEL_*`` variables say."""
    return RequestTracer(tracer_provider(environ).get_tracer(INSTRUMENTATION), clock)
