"""One client request on its way to a node: attempts, failover, and the relay of the answer.

An ``Exchange`` picks a node through its pool, sends the request over a pooled
connection, fails over to another node while nothing has reached the client
yet, and then hands the body to a ``BodyRelay``.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from blyanproxy.core import (
    BAD_RESPONSE,
    RESPONSE_TIMEOUT,
    Attempts,
    ProxyError,
    Route,
    downstream_response_headers,
    upstream_request_headers,
    write_error,
)
from blyanproxy.fleet import Lease, LeasePool
from blyanproxy.forward import traffic
from blyanproxy.forward.context import ForwardContext
from blyanproxy.forward.failover import Failover, classify_failure
from blyanproxy.forward.relay import CLIENT_GONE, COMPLETE, IDLE_TIMEOUT, UPSTREAM_BROKE, BodyRelay
from blyanproxy.logs import logger
from blyanproxy.upstream import UpstreamConnection, serialize_request_head

log = logger("proxy")

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


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

    def __init__(self, context: ForwardContext, request, tally: traffic.RequestTally, route: Route,
                 pool: LeasePool) -> None:
        self._context = context
        self._rules = context.rules
        self._request = request
        self._route = route
        self._method = request.method
        request.content.seek(0)
        self._body = request.content.read()
        self._failover = Failover(Attempts(context.rules.attempts), pool, route, context.clock,
                                  context.traffic, self._try_node, self._fail)
        self._lease: Lease | None = None
        self._head = b""
        self._pending: defer.Deferred | None = None
        self._conn: UpstreamConnection | None = None
        self._timer = None
        self._relay: BodyRelay | None = None
        self._sent_at = 0.0
        self._tally = tally
        self._client_gone = False
        request.notifyFinish().addErrback(self._on_client_gone)

    def start(self) -> None:
        """Send the first attempt."""
        self._failover.start()

    # -- attempts -------------------------------------------------------------

    def _try_node(self, lease: Lease, fresh: bool) -> None:
        if self._conn is not None:  # a status failover: the previous node's answer is dropped
            conn, self._conn = self._conn, None
            conn.abort()
        if lease is not self._lease:
            self._lease = lease
            self._tally.node = lease.node.name
            self._tally.attempts = self._failover.count
            self._head = self._request_head(lease)
        self._connect(fresh)

    def _request_head(self, lease: Lease) -> bytes:
        url = lease.node.url
        headers = upstream_request_headers(
            self._request.requestHeaders.getAllRawHeaders(),
            url.netloc.encode("ascii"),
            self._tally.client,
            trust_forwarded=self._rules.trust_forwarded,
            strip_origin=self._rules.strip_origin,
        )
        if self._body or self._method in _BODY_METHODS:
            headers.append((b"Content-Length", [b"%d" % len(self._body)]))
        return serialize_request_head(self._method, url.path_bytes + self._route.upstream_target, headers)

    def _connect(self, fresh: bool) -> None:
        url = self._lease.node.url
        self._pending = self._context.upstream.connection(url.scheme, url.host, url.port, fresh=fresh)
        self._pending.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: UpstreamConnection) -> None:
        self._pending = None
        self._conn = conn
        self._sent_at = self._context.clock.seconds()
        self._timer = self._context.clock.callLater(self._rules.proxy_timeout, self._header_timeout)
        conn.request(self._method, self._head, self._body, self)

    def _connect_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._client_gone:
            self._lease.release()
            return
        self._failover.failed(classify_failure(failure))

    def _header_timeout(self) -> None:
        self._timer = None
        conn, self._conn = self._conn, None
        conn.abort()
        self._failover.failed(RESPONSE_TIMEOUT)

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
        self._failover.failed(classify_failure(reason), conn.reused, conn.bytes_received)

    def response_started(self, status: int, reason: bytes, headers, length: int | None) -> None:
        self._cancel_timer()
        self._tally.ttfb = self._context.clock.seconds() - self._tally.started
        if not self._failover.answered(status):
            return  # another node takes the request
        lease = self._lease
        lease.responded(self._context.clock.seconds() - self._sent_at)
        try:
            self._relay = self._start_relay(status, reason, headers, length)
        except Exception:  # a head Twisted refuses to write: the node's fault, answered as 502
            log.failure("node {node} sent a response head that cannot be relayed", node=lease.node.name)
            conn, self._conn = self._conn, None
            conn.abort()
            self._failover.unusable(BAD_RESPONSE)
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
        out.setRawHeaders(b"X-Blyan-Attempts", [b"%d" % self._failover.count])
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
            self._context.clock,
            idle_timeout=self._rules.idle_timeout,
            sse_keepalive=self._rules.sse_keepalive,
            # Comments and error events would break a body of announced length.
            is_sse=is_sse and length is None,
            on_end=self._on_relay_end,
            raw_chunks=conn if raw_chunks else None,
        )
        relay.start(conn)
        if raw_chunks:
            conn.pass_chunks_raw()
        if relay.is_sse:
            self._context.traffic.stream("sse", +1)
        return relay

    def _on_relay_end(self, how: str) -> None:
        self._conn = None
        self._lease.release()
        if self._relay.is_sse:
            self._context.traffic.stream("sse", -1)
        if how not in (COMPLETE, CLIENT_GONE):
            log.warn("stream from node {node} ended: {how}", node=self._lease.node.name, how=how)
        self._tally.bytes_out = self._relay.bytes_sent
        self._tally.end(self._request.code, _ENDINGS[how])

    def _fail(self, err: ProxyError) -> None:
        if not self._client_gone:
            write_error(self._request, err)
            self._tally.bytes_out = self._request.sentLength  # the proxy's own answer's body
        self._tally.end(err.status, traffic.ended_by(err))

    def _on_client_gone(self, failure) -> None:
        self._client_gone = True
        if self._failover.waiting:
            self._failover.cancel()  # waiting out RETRY_DELAY_MS: nothing else to stop
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
            self._tally.end(traffic.CLIENT_CLOSED_STATUS, traffic.CLIENT_GONE)
