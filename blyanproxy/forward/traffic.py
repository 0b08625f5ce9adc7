"""The end-of-request hook: every request ends in one place, and the access log, metrics and counters listen.

``TrafficRecorder.begin(request)`` opens a ``RequestTally`` when a request
arrives (forwarded or answered by the proxy itself); whoever carries the
request fills it in, and ``RequestTally.end`` builds the request's
``AccessRecord`` exactly once, when it ends (a stream or WebSocket when it
ends, not when it starts), and hands it to every listener ``subscribe``\\ d:
the access log (``write_access_line``), the metrics and the
``RequestCounters``. The access log line is greppable ``key=value`` text;
query values are replaced by ``…`` because they may hold secrets (so is a
parameter without a name, a bare value), query names are decoded but escaped
(``log_escaped``), and no header (so no token or API key) is ever logged.

Each request gets its id here (the client's ``X-Request-Id`` when usable,
``core.request_id_for``), returned in the answer's ``X-Request-Id`` and sent
to every node it is tried on. A ``RequestWatcher`` (``TrafficRecorder.watch``;
the OpenTelemetry tracer of ``blyanproxy.tracing``) hears every request for a
node from beginning to end: its attempts (from ``Failover``, through the
tally), a queue wait, and its record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable, Protocol

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from blyanproxy.core import (
    REQUEST_ID_HEADER,
    ClientFacts,
    ForwardTrust,
    Node,
    ProxyError,
    client_facts,
    form_decoded,
    query_parameters,
    request_id_for,
)
from blyanproxy.logs import log_info_line, logger

log = logger("access")
proxy_log = logger("proxy")

#: How a request ended.
COMPLETE = "complete"
CLIENT_GONE = "client_gone"
UPSTREAM_BROKE = "upstream_broke"
TIMEOUT = "timeout"
ERROR = "error"
#: How a WebSocket ended once the node had accepted it.
CLIENT_CLOSED = "client_closed"
NODE_CLOSED = "node_closed"

#: Endings counted as failures (the proxy answered with its own error, or cut the answer short).
FAILED_ENDINGS = frozenset({UPSTREAM_BROKE, TIMEOUT, ERROR})

#: The status logged for a client that left before any answer (nginx's convention).
CLIENT_CLOSED_STATUS = 499


def ended_by(error: ProxyError) -> str:
    """How a request answered with the proxy's ``error`` ended: ``timeout`` for a 504, else ``error``."""
    return TIMEOUT if error.status == 504 else ERROR


@attrs.frozen
class AccessRecord:
    """One finished request.

    ``bytes_in`` counts the request body and, for a WebSocket, what the
    client sent after the upgrade; ``bytes_out`` the response body, or what
    the node sent after the upgrade. ``own_endpoint`` marks a request the
    proxy answered itself (``/health``, ``/_admin`` …), never meant for a node.
    ``request_id`` is the id the answer's ``X-Request-Id`` carried.
    ``caller`` is the caller key's short hash (or client address) when
    admission is on; ``tokens_in``/``tokens_out`` the prompt and completion
    tokens the node's answer reported (None: it reported none).
    """

    method: str
    target: bytes
    status: int
    node: str | None
    attempts: int
    ttfb: float | None
    duration: float
    bytes_in: int
    bytes_out: int
    ended: str
    client: str
    own_endpoint: bool = False
    request_id: str | None = None
    model: str | None = None
    caller: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None


def log_escaped(raw: bytes) -> str:
    """``raw`` as text fit for one field of a log line: UTF-8, every other character escaped.

    Printable characters stay; a byte that is not UTF-8 becomes ``\\xNN``, and so
    does every control character (CR, LF, ESC, DEL …) below U+0100; other
    unprintable ones (U+2028, U+2029, bidi controls) become ``\\uNNNN``. A space
    is escaped too, so the field cannot split, and a backslash is doubled.
    """
    out = []
    for char in raw.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char != " " and char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def redacted_target(target: bytes) -> str:
    """The path with every query value replaced by ``…``: names kept (decoded, ``log_escaped``) for
    grepping; a parameter without a name (no ``=``: a bare value) is ``…`` whole.

    The path is logged as sent (twisted.web accepts only printable ASCII there).
    """
    path, sep, query = target.partition(b"?")
    text = path.decode("latin-1")
    if not sep:
        return text
    parts = ["…" if value is None else log_escaped(form_decoded(name)) + "=…"
             for name, value in query_parameters(query)]
    return text + "?" + "&".join(parts)


def access_line(record: AccessRecord) -> str:
    """The access log line of ``record``."""
    ttfb = "-" if record.ttfb is None else f"{record.ttfb * 1000:.1f}"
    return (
        f"{record.client} {record.method} {redacted_target(record.target)} status={record.status} "
        f"node={record.node or '-'} attempts={record.attempts} ttfb_ms={ttfb} "
        f"duration_ms={record.duration * 1000:.1f} bytes_in={record.bytes_in} bytes_out={record.bytes_out} "
        f"ended={record.ended}{_token_fields(record)} request_id={record.request_id or '-'}"
    )


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


#: How a record's fields are named and shown in the access event (the others go as they are).
_EVENT_FIELDS: dict[str, tuple[str, Callable[[Any], object]]] = {
    "target": ("path", redacted_target),
    "ttfb": ("ttfb_ms", _milliseconds),
    "duration": ("duration_ms", _milliseconds),
}


def access_fields(record: AccessRecord) -> dict[str, object]:
    """Every field of ``record``, named as the access line names it: ``path`` redacted, times in ms."""
    fields: dict[str, object] = {}
    for field in attrs.fields(AccessRecord):
        name, shown = _EVENT_FIELDS.get(field.name, (field.name, lambda value: value))
        fields[name] = shown(getattr(record, field.name))
    return fields


def _token_fields(record: AccessRecord) -> str:
    if record.tokens_in is None and record.tokens_out is None:
        return ""
    return f" tokens_in={record.tokens_in or 0} tokens_out={record.tokens_out or 0}"


def write_access_line(record: AccessRecord) -> None:
    """Log ``record``'s access line (a listener of the end-of-request hook).

    The event's message is the line; its fields are ``access_fields`` (for
    ``LOG_FORMAT=json``). Written to twistd's text log straight when that is
    the log (``logs.log_info_line``).
    """
    log_info_line(log, access_line(record), lambda: access_fields(record))


@attrs.define
class RequestCounters:
    """Requests for nodes that ended, and those the proxy answered with its own error or cut short.

    A listener of the end-of-request hook (``count``); requests for the
    proxy's own endpoints are not counted.
    """

    requests: int = 0
    failures: int = 0

    def count(self, record: AccessRecord) -> None:
        """Count one finished request."""
        if record.own_endpoint:
            return
        self.requests += 1
        if record.ended in FAILED_ENDINGS:
            self.failures += 1


def _body_size(request: Request) -> int:
    """The size of the request body twisted.web has read (it is read whole before the resource runs)."""
    content = getattr(request, "content", None)
    if content is None:
        return 0
    position = content.tell()
    size = content.seek(0, 2)
    content.seek(position)
    return size


@attrs.define(eq=False)
class RequestTally:
    """One request's figures while it is under way, filled in by whoever carries it.

    ``end(status, ended)`` turns them into the request's ``AccessRecord`` and
    reports it; only the first call counts. The attempt events
    (``attempt_started``, ``attempt_failed``: ``Failover`` reports them) and
    ``queue_waited`` go on to the recorder's watchers; ``node_headers`` are the
    headers the current attempt sends its node (the request id, and what
    watchers add, such as ``traceparent``).
    """

    _clock: IReactorTime = attrs.field(repr=False)
    _recorder: TrafficRecorder = attrs.field(repr=False)
    method: str
    target: bytes
    client: ClientFacts
    started: float
    request_id: str
    own_endpoint: bool = False
    node: str | None = None
    attempts: int = 0
    ttfb: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    node_headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    model: str | None = None
    caller: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    _done: bool = attrs.field(default=False, init=False)

    def attempt_started(self, node: Node, number: int) -> None:
        """Attempt ``number`` goes to ``node``: its ``node_headers`` are made."""
        headers = [(REQUEST_ID_HEADER, self.request_id.encode("ascii"))]
        for watcher in self._recorder.watchers:
            headers.extend(watcher.attempt_started(self, node, number))
        self.node_headers = headers

    def attempt_failed(self, node: str, reason: str) -> None:
        """The current attempt, on ``node``, failed for ``reason`` before any byte reached the client."""
        self._recorder.attempt_failed(node, reason)
        for watcher in self._recorder.watchers:
            watcher.attempt_failed(self, node, reason)

    def queue_waited(self, since: float) -> None:
        """The request waited for admission from ``since`` until now (the hook for an admission queue)."""
        now = self._clock.seconds()
        for watcher in self._recorder.watchers:
            watcher.queue_waited(self, since, now)

    def end(self, status: int, ended: str) -> None:
        """The request ended with ``status`` (what the client got, or 499), as ``ended`` says."""
        if self._done:
            return
        self._done = True
        self._recorder.finished(self, AccessRecord(
            method=self.method,
            target=self.target,
            status=status,
            node=self.node,
            attempts=self.attempts,
            ttfb=self.ttfb,
            duration=self._clock.seconds() - self.started,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            ended=ended,
            client=self.client.origin,
            own_endpoint=self.own_endpoint,
            request_id=self.request_id,
            model=self.model,
            caller=self.caller,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
        ))


class RequestWatcher(Protocol):
    """What hears every request for a node as it goes (the tracer); the proxy's own endpoints are not watched."""

    def began(self, tally: RequestTally, headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> None:
        """A request arrived with ``headers``."""

    def attempt_started(self, tally: RequestTally, node: Node, number: int) -> Sequence[tuple[bytes, bytes]]:
        """Attempt ``number`` goes to ``node``: the headers to send it besides the request's own."""

    def attempt_failed(self, tally: RequestTally, node: str, reason: str) -> None:
        """The current attempt failed for ``reason`` (the request fails over or gives up)."""

    def queue_waited(self, tally: RequestTally, since: float, until: float) -> None:
        """The request waited for admission from ``since`` to ``until``."""

    def ended(self, tally: RequestTally, record: AccessRecord) -> None:
        """The request ended as ``record`` says."""


class TrafficMetrics(Protocol):
    """What the recorder tells the metrics (a ``ProxyMetrics``)."""

    def attempt_failed(self, node: str, reason: str) -> None:
        """Count a failed attempt."""

    def stream(self, kind: str, delta: int) -> None:
        """An SSE stream or WebSocket (``kind``) opened (+1) or closed (-1)."""


class TrafficRecorder:
    """The data path's reporting point: the end-of-request hook, failed attempts and open streams.

    ``trust`` (``TRUST_FORWARDED``) decides which client address a request's
    record names. ``metrics`` (a ``ProxyMetrics``, or None) is told of failed
    attempts and of SSE streams and WebSockets opening and closing.
    """

    def __init__(self, clock: IReactorTime, trust: bool | ForwardTrust = False,
                 metrics: TrafficMetrics | None = None) -> None:
        self._clock = clock
        self._trust = trust
        self._metrics = metrics
        self._listeners: list[Callable[[AccessRecord], None]] = []
        self.watchers: list[RequestWatcher] = []

    def subscribe(self, listener: Callable[[AccessRecord], None]) -> None:
        """Call ``listener(record)`` for every request that ends from now on."""
        self._listeners.append(listener)

    def watch(self, watcher: RequestWatcher) -> None:
        """Tell ``watcher`` of every request for a node that arrives from now on, as it goes."""
        self.watchers.append(watcher)

    def begin(self, request: Request, own_endpoint: bool = False) -> RequestTally:
        """Open the tally of a twisted.web request that just arrived, and give the answer its ``X-Request-Id``."""
        client = client_facts(request, self._trust)
        request_id = request_id_for(request.requestHeaders.getRawHeaders(REQUEST_ID_HEADER, []))
        if request_id.replaced is not None:
            proxy_log.info("replaced the X-Request-Id of a request from {client} by {request_id}: {why}",
                           client=client.origin, request_id=request_id.value, why=request_id.replaced)
        request.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [request_id.value.encode("ascii")])
        tally = RequestTally(
            self._clock,
            self,
            method=request.method.decode("latin-1"),
            target=request.uri,
            client=client,
            started=self._clock.seconds(),
            request_id=request_id.value,
            own_endpoint=own_endpoint,
            bytes_in=_body_size(request),
        )
        if not own_endpoint:
            for watcher in self.watchers:
                watcher.began(tally, request.requestHeaders.getAllRawHeaders())
        return tally

    def finished(self, tally: RequestTally, record: AccessRecord) -> None:
        """``tally``'s request ended as ``record`` (``RequestTally.end`` tells): every listener hears it."""
        for listener in self._listeners:
            listener(record)
        if not tally.own_endpoint:
            for watcher in self.watchers:
                watcher.ended(tally, record)

    def attempt_failed(self, node: str, reason: str) -> None:
        """One attempt on ``node`` failed before any byte reached the client."""
        if self._metrics is not None:
            self._metrics.attempt_failed(node, reason)

    def stream(self, kind: str, delta: int) -> None:
        """An SSE stream or WebSocket (``kind``) opened (+1) or closed (-1)."""
        if self._metrics is not None:
            self._metrics.stream(kind, delta)
