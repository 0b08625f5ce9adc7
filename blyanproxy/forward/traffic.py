"""The end-of-request hook: every request ends in one place, and the access log, metrics and counters listen.

``TrafficRecorder.begin(request)`` opens a ``RequestTally`` when a request
arrives (forwarded or answered by the proxy itself); whoever carries the
request fills it in, and ``RequestTally.end`` builds the request's
``AccessRecord`` exactly once, when it ends (a stream or WebSocket when it
ends, not when it starts), and hands it to every listener ``subscribe``\\ d:
the access log (``write_access_line``), the metrics and the
``RequestCounters``. The access log line is greppable ``key=value`` text;
query values are replaced by ``…`` because they may hold secrets, and no
header (so no token or API key) is ever logged.
"""

from __future__ import annotations

from typing import Callable, Protocol
from urllib.parse import parse_qsl

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from blyanproxy.core import ClientFacts, ForwardTrust, ProxyError, client_facts
from blyanproxy.logs import logger

log = logger("access")

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
    model: str | None = None
    caller: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None


def redacted_target(target: bytes) -> str:
    """The path with every query value replaced by ``…`` (names kept, for grepping)."""
    path, sep, query = target.partition(b"?")
    text = path.decode("latin-1")
    if not sep:
        return text
    names = [name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    return text + "?" + "&".join(f"{name}=…" for name in names)


def access_line(record: AccessRecord) -> str:
    """The access log line of ``record``."""
    ttfb = "-" if record.ttfb is None else f"{record.ttfb * 1000:.1f}"
    return (
        f"{record.client} {record.method} {redacted_target(record.target)} status={record.status} "
        f"node={record.node or '-'} attempts={record.attempts} ttfb_ms={ttfb} "
        f"duration_ms={record.duration * 1000:.1f} bytes_in={record.bytes_in} bytes_out={record.bytes_out} "
        f"ended={record.ended}{_token_fields(record)}"
    )


def _token_fields(record: AccessRecord) -> str:
    if record.tokens_in is None and record.tokens_out is None:
        return ""
    return f" tokens_in={record.tokens_in or 0} tokens_out={record.tokens_out or 0}"


def write_access_line(record: AccessRecord) -> None:
    """Log ``record``'s access line (a listener of the end-of-request hook)."""
    log.info("{line}", line=access_line(record))


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
    reports it; only the first call counts.
    """

    _clock: IReactorTime = attrs.field(repr=False)
    _report: Callable[[AccessRecord], None] = attrs.field(repr=False)
    method: str
    target: bytes
    client: ClientFacts
    started: float
    own_endpoint: bool = False
    node: str | None = None
    attempts: int = 0
    ttfb: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    model: str | None = None
    caller: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    _done: bool = attrs.field(default=False, init=False)

    def end(self, status: int, ended: str) -> None:
        """The request ended with ``status`` (what the client got, or 499), as ``ended`` says."""
        if self._done:
            return
        self._done = True
        self._report(AccessRecord(
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
            model=self.model,
            caller=self.caller,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
        ))


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

    def subscribe(self, listener: Callable[[AccessRecord], None]) -> None:
        """Call ``listener(record)`` for every request that ends from now on."""
        self._listeners.append(listener)

    def begin(self, request: Request, own_endpoint: bool = False) -> RequestTally:
        """Open the tally of a twisted.web request that just arrived."""
        return RequestTally(
            self._clock,
            self._finished,
            method=request.method.decode("latin-1"),
            target=request.uri,
            client=client_facts(request, self._trust),
            started=self._clock.seconds(),
            own_endpoint=own_endpoint,
            bytes_in=_body_size(request),
        )

    def _finished(self, record: AccessRecord) -> None:
        for listener in self._listeners:
            listener(record)

    def attempt_failed(self, node: str, reason: str) -> None:
        """One attempt on ``node`` failed before any byte reached the client."""
        if self._metrics is not None:
            self._metrics.attempt_failed(node, reason)

    def stream(self, kind: str, delta: int) -> None:
        """An SSE stream or WebSocket (``kind``) opened (+1) or closed (-1)."""
        if self._metrics is not None:
            self._metrics.stream(kind, delta)
