"""One client request on its way to a node: attempts, failover, and the relay of the answer.

An ``Exchange`` picks a node through its pool, sends the request over a pooled
connection, fails over to another node while nothing has reached the client
yet, and then hands the body to a ``BodyRelay``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer, error
from twisted.python.failure import Failure

from blyanproxy.core import (
    ProxyError,
    Route,
    client_facts,
    downstream_response_headers,
    upstream_request_headers,
    write_error,
)
from blyanproxy.fleet import Lease
from blyanproxy.forward import traffic
from blyanproxy.forward.relay import CLIENT_GONE, COMPLETE, IDLE_TIMEOUT, UPSTREAM_BROKE, BodyRelay
from blyanproxy.logs import logger
from blyanproxy.upstream import ProtocolError, UpstreamConnection, serialize_request_head

if TYPE_CHECKING:
    from blyanproxy.forward.resource import ProxyResource

log = logger("proxy")

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


def classify_failure(failure: Failure) -> tuple:
    """``(reason, error)`` for a failed attempt: a short reason word and the client's error.

    Every such failure happened before any byte reached the client, so each may
    fail over to another node.
    """
    value = failure.value
    if isinstance(value, error.TimeoutError):
        return "connect_timeout", ProxyError(504, "upstream_timeout", "connecting to the node timed out")
    if isinstance(value, error.ConnectionRefusedError):
        return "refused", ProxyError(502, "upstream_unreachable", "the node refused the connection")
    if isinstance(value, (error.DNSLookupError, error.ConnectError)):
        return "connect_failed", ProxyError(502, "upstream_unreachable", "the node could not be reached")
    if isinstance(value, ProtocolError):
        return "bad_response", ProxyError(502, "upstream_failed", "the node's answer is not valid HTTP")
    if "SSL" in type(value).__module__ or "ssl" in type(value).__module__:
        return "tls_failed", ProxyError(502, "upstream_tls", "the TLS handshake with the node failed")
    return "no_response", ProxyError(502, "upstream_failed", "the node closed the connection without answering")


def _header_timeout_error() -> ProxyError:
    return ProxyError(504, "upstream_timeout", "the node did not answer in time")


#: How a relay ending reads in the access log.
_ENDINGS = {
    COMPLETE: traffic.COMPLETE,
    CLIENT_GONE: traffic.CLIENT_GONE,
    UPSTREAM_BROKE: traffic.UPSTREAM_BROKE,
    IDLE_TIMEOUT: traffic.TIMEOUT,
}


class Exchange:
    """One client request on its way through the proxy: attempts, failover and relay.

    It receives the upstream connection's head (``request_failed`` or
    ``response_started``); the body then goes straight to the ``BodyRelay``.
    """

    def __init__(self, forwarder: ProxyResource, request, route: Route, pool) -> None:
        self._forwarder = forwarder
        self._settings = forwarder.settings
        self._request = request
        self._route = route
        self._pool = pool
        self._method = request.method
        request.content.seek(0)
        self._body = request.content.read()
        self._excluded: set[str] = set()
        self._attempts = 0
        self._lease: Lease | None = None
        self._head = b""
        self._pending: defer.Deferred | None = None
        self._conn: UpstreamConnection | None = None
        self._timer = None
        self._relay: BodyRelay | None = None
        self._fresh_retry_used = False
        self._sent_at = 0.0
        self._started = forwarder.clock.seconds()
        self._ttfb: float | None = None
        self._recorded = False
        self._client_gone = False
        request.notifyFinish().addErrback(self._on_client_gone)

    def start(self) -> None:
        """Send the first attempt."""
        self._forwarder.counters.requests += 1
        self._attempt(None)

    # -- attempts -------------------------------------------------------------

    def _attempt(self, last_error: ProxyError | None) -> None:
        self._timer = None
        lease = None
        if self._attempts < self._settings.max_attempts:
            lease = self._pool.acquire(self._route, frozenset(self._excluded))
        if lease is None:
            self._fail(last_error or self._forwarder.no_node_error())
            return
        self._use(lease)

    def _use(self, lease: Lease) -> None:
        self._attempts += 1
        self._excluded.add(lease.node.id)
        self._lease = lease
        self._head = self._request_head(lease)
        self._connect(fresh=False)

    def _request_head(self, lease: Lease) -> bytes:
        url = lease.node.url
        headers = upstream_request_headers(
            self._request.requestHeaders.getAllRawHeaders(),
            url.netloc.encode("ascii"),
            client_facts(self._request),
            trust_forwarded=self._settings.trust_forwarded,
            strip_origin=self._settings.strip_origin,
        )
        if self._body or self._method in _BODY_METHODS:
            headers.append((b"Content-Length", [b"%d" % len(self._body)]))
        return serialize_request_head(self._method, url.path_bytes + self._route.upstream_target, headers)

    def _connect(self, fresh: bool) -> None:
        url = self._lease.node.url
        self._pending = self._forwarder.upstream.connection(url.scheme, url.host, url.port, fresh=fresh)
        self._pending.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: UpstreamConnection) -> None:
        self._pending = None
        self._conn = conn
        self._sent_at = self._forwarder.clock.seconds()
        self._timer = self._forwarder.clock.callLater(self._settings.proxy_timeout, self._header_timeout)
        conn.request(self._method, self._head, self._body, self)

    def _connect_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._client_gone:
            self._lease.release()
            return
        self._attempt_failed(*classify_failure(failure))

    def _attempt_failed(self, reason: str, err: ProxyError) -> None:
        log.info(
            "attempt {attempt} on node {node} failed: {reason}",
            attempt=self._attempts, node=self._lease.node.name, reason=reason,
        )
        self._lease.failed(reason)
        self._forwarder.traffic.attempt_failed(self._lease.node.name, reason)
        if self._settings.retry_delay:
            self._timer = self._forwarder.clock.callLater(self._settings.retry_delay, self._attempt, err)
        else:
            self._attempt(err)

    def _header_timeout(self) -> None:
        self._timer = None
        conn, self._conn = self._conn, None
        conn.abort()
        self._attempt_failed("response_timeout", _header_timeout_error())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- BodyReceiver ---------------------------------------------------------

    def request_failed(self, reason) -> None:
        self._cancel_timer()
        conn, self._conn = self._conn, None
        if not isinstance(reason, Failure):
            reason = Failure(reason)
        if conn.reused and conn.bytes_received == 0 and not self._fresh_retry_used:
            # A kept-alive connection the node had already closed: not the node's fault.
            self._fresh_retry_used = True
            self._connect(fresh=True)
            return
        self._attempt_failed(*classify_failure(reason))

    def response_started(self, status: int, reason: bytes, headers, length: int | None) -> None:
        self._cancel_timer()
        self._ttfb = self._forwarder.clock.seconds() - self._started
        lease = self._lease
        if status in self._settings.retry_on_status and self._attempts < self._settings.max_attempts:
            following = self._pool.acquire(self._route, frozenset(self._excluded))
            if following is not None:
                log.info("node {node} answered {status}; failing over", node=lease.node.name, status=status)
                conn, self._conn = self._conn, None
                conn.abort()
                lease.failed(f"status_{status}")
                self._forwarder.traffic.attempt_failed(lease.node.name, f"status_{status}")
                self._use(following)
                return
        lease.responded(self._forwarder.clock.seconds() - self._sent_at)
        try:
            self._relay = self._start_relay(status, reason, headers, length)
        except Exception:  # a head Twisted refuses to write: the node's fault, answered as 502
            log.failure("node {node} sent a response head that cannot be relayed", node=lease.node.name)
            conn, self._conn = self._conn, None
            conn.abort()
            lease.failed("bad_response")
            self._fail(ProxyError(502, "upstream_failed", "the node's answer is not valid HTTP"))
            return
        self._conn.deliver_body(self._relay)

    # -- the response ---------------------------------------------------------

    def _start_relay(self, status: int, reason: bytes, headers, length: int | None) -> BodyRelay:
        request = self._request
        request.setResponseCode(status, reason)
        out = request.responseHeaders
        for name, values in downstream_response_headers(headers):
            out.setRawHeaders(name, values)
        out.setRawHeaders(b"X-Blyan-Node", [self._lease.node.name_bytes])
        out.setRawHeaders(b"X-Blyan-Attempts", [b"%d" % self._attempts])
        content_type = out.getRawHeaders(b"content-type")
        is_sse = bool(content_type) and content_type[0].lower().startswith(b"text/event-stream")
        if is_sse and not out.hasHeader(b"x-accel-buffering"):
            out.setRawHeaders(b"X-Accel-Buffering", [b"no"])
        if self._method == b"HEAD" or status == 304:
            # No body follows, but the length a GET would have had is the node's to tell.
            declared = [v for n, vs in headers if n.lower() == b"content-length" for v in vs]
            if declared:
                out.setRawHeaders(b"Content-Length", declared[:1])
        elif length is not None and status != 204:
            out.setRawHeaders(b"Content-Length", [b"%d" % length])
        conn = self._conn
        raw_chunks = conn.chunked and request.clientproto == b"HTTP/1.1"
        relay = BodyRelay(
            request,
            self._forwarder.clock,
            idle_timeout=self._settings.idle_timeout,
            sse_keepalive=self._settings.sse_keepalive,
            # Comments and error events would break a body of announced length.
            is_sse=is_sse and length is None,
            on_end=self._on_relay_end,
            raw_chunks=conn if raw_chunks else None,
        )
        relay.start(conn)
        if raw_chunks:
            conn.pass_chunks_raw()
        if relay.is_sse:
            self._forwarder.traffic.stream("sse", +1)
        return relay

    def _on_relay_end(self, how: str) -> None:
        self._conn = None
        self._lease.release()
        if self._relay.is_sse:
            self._forwarder.traffic.stream("sse", -1)
        if how not in (COMPLETE, CLIENT_GONE):
            self._forwarder.counters.failures += 1
            log.warn("stream from node {node} ended: {how}", node=self._lease.node.name, how=how)
        self._record(_ENDINGS[how], self._request.code)

    def _fail(self, err: ProxyError) -> None:
        self._forwarder.counters.failures += 1
        if not self._client_gone:
            write_error(self._request, err)
        self._record(traffic.TIMEOUT if err.status == 504 else traffic.ERROR, err.status)

    def _record(self, ended: str, status: int) -> None:
        """Report the end of this request, once."""
        if self._recorded:
            return
        self._recorded = True
        self._forwarder.traffic.finished(traffic.AccessRecord(
            method=self._method.decode("latin-1"),
            target=self._request.uri,
            status=status,
            node=self._lease.node.name if self._lease is not None else None,
            attempts=self._attempts,
            ttfb=self._ttfb,
            duration=self._forwarder.clock.seconds() - self._started,
            bytes_out=self._relay.bytes_sent if self._relay is not None else 0,
            ended=ended,
            client=client_facts(self._request, self._settings.trust_forwarded).origin
            if not self._client_gone else "-",
        ))

    def _on_client_gone(self, failure) -> None:
        self._client_gone = True
        if self._timer is not None and self._conn is None and self._pending is None:
            self._cancel_timer()  # waiting out RETRY_DELAY_MS: nothing else to stop
        elif self._relay is not None:
            self._relay.client_gone()
        elif self._pending is not None:
            self._pending.cancel()
        elif self._conn is not None:
            self._cancel_timer()
            conn, self._conn = self._conn, None
            conn.abort()
            self._lease.release()
        if self._relay is None:
            self._record(traffic.CLIENT_GONE, traffic.CLIENT_CLOSED_STATUS)
