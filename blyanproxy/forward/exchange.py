"""One client request on its way to a node: attempts, failover, and the relay of the answer.

An ``Exchange`` picks a node through its pool, sends the request over a pooled
connection, fails over to another node while nothing has reached the client
yet, and then hands the body to a ``BodyRelay``.
"""

from __future__ import annotations

import functools
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request

from blyanproxy.core import (
    BAD_RESPONSE,
    REQUEST_ID_HEADER,
    RESPONSE_TIMEOUT,
    AttemptFailure,
    Attempts,
    ProxyError,
    RawHeaders,
    Route,
    downstream_response_headers,
    error_dialect,
    replace_headers,
    route_target,
    upstream_request_headers,
    write_error,
)
from blyanproxy.fleet import Caller, Lease, LeasePool
from blyanproxy.forward import traffic
from blyanproxy.forward.context import ForwardContext
from blyanproxy.forward.failover import Failover, classify_failure
from blyanproxy.forward.relay import CLIENT_GONE, COMPLETE, IDLE_TIMEOUT, UPSTREAM_BROKE, BodyRelay
from blyanproxy.logs import logger
from blyanproxy.upstream import BodyReceiver, ProtocolError, UpstreamConnection, serialize_request_head

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

    Each attempt's connection reports its response head to an ``_Attempt``,
    which tells the exchange; the body of the answer relayed then goes from the
    connection straight to the ``BodyRelay``.
    """

    def __init__(self, context: ForwardContext, request: Request, tally: traffic.RequestTally, route: Route,
                 body: bytes, pool: LeasePool, caller: Caller | None = None) -> None:
        self._context = context
        self._rules = context.rules
        self._request = request
        self._route = route
        self._method = request.method
        self._body = body
        self._failover = Failover(Attempts(context.rules.attempts), pool, route, context.clock,
                                  tally, self._try_node, self._fail, self._abandon_attempt,
                                  queue=context.admission.queue if context.admission is not None else None,
                                  caller=caller)
        self._lease: Lease | None = None  # the latest attempt's; ``_head`` is its request head
        self._head = b""
        self._pending: defer.Deferred[UpstreamConnection] | None = None
        self._attempt: _Attempt | None = None
        self._relay: BodyRelay | None = None
        self._tally = tally
        self._client_gone = False
        request.notifyFinish().addErrback(self._on_client_gone)

    def start(self) -> None:
        """Send the first attempt."""
        self._failover.start()

    # -- attempts -------------------------------------------------------------

    def _try_node(self, lease: Lease, fresh: bool) -> None:
        if self._attempt is not None:  # a status failover: the previous node's answer is dropped
            attempt, self._attempt = self._attempt, None
            attempt.abort()
        if lease is not self._lease:
            self._lease = lease
            self._tally.node = lease.node.name
            self._tally.attempts = self._failover.count
            self._head = self._request_head(lease)
        url = lease.node.url
        pending = self._context.upstream.connection(url.scheme, url.host, url.port, fresh=fresh)
        self._pending = pending
        pending.addCallbacks(self._connected, self._connect_failed, callbackArgs=(lease,), errbackArgs=(lease,))

    def _request_head(self, lease: Lease) -> bytes:
        url = lease.node.url
        headers = upstream_request_headers(
            self._request.requestHeaders.getAllRawHeaders(),
            url.netloc.encode("ascii"),
            self._tally.client,
            trust_forwarded=self._rules.trust_forwarded,
            strip_origin=self._rules.strip_origin,
        )
        headers = replace_headers(headers, self._tally.node_headers)
        if self._body or self._method in _BODY_METHODS:
            headers.append((b"Content-Length", [b"%d" % len(self._body)]))
        return serialize_request_head(self._method, url.path_bytes + route_target(self._route, lease.engine), headers)

    def _connected(self, conn: UpstreamConnection, lease: Lease) -> None:
        self._pending = None
        attempt = _Attempt(self, lease, conn, self._context.clock, self._rules.proxy_timeout)
        self._attempt = attempt
        attempt.send(self._method, self._head, self._body)

    def _abandon_attempt(self) -> None:
        """The current attempt's node went out while it waited (the failover tells): drop the attempt."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()  # ``_connect_failed`` sees it abandoned
        elif self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.abort()

    def _connect_failed(self, failure: Failure, lease: Lease) -> None:
        if self._pending is None and not self._client_gone:
            return  # abandoned: the node went out and the failover has moved on
        self._pending = None
        if self._client_gone:
            lease.release()
            return
        self._failover.failed(classify_failure(failure))

    def attempt_failed(self, failure: AttemptFailure, reused: bool = False, bytes_received: int = 0) -> None:
        """The current attempt failed before its answer began (its ``_Attempt`` tells): fail over."""
        self._attempt = None
        self._failover.failed(failure, reused, bytes_received)

    def answer_started(self, attempt: _Attempt, status: int, reason: bytes, headers: RawHeaders,
                       length: int | None) -> None:
        """The current attempt's response head arrived (its ``_Attempt`` tells): relay it, or fail over."""
        self._tally.ttfb = self._context.clock.seconds() - self._tally.started
        if not self._failover.answered(status):
            return  # another node takes the request (``_try_node`` dropped this answer)
        lease = attempt.lease
        lease.responded(self._context.clock.seconds() - attempt.sent_at)
        try:
            relay = self._start_relay(attempt, status, reason, headers, length)
        except Exception:  # a head Twisted refuses to write: the node's fault, answered as 502
            log.failure("node {node} sent a response head that cannot be relayed", node=lease.node.name)
            self._attempt = None
            attempt.abort()
            self._failover.unusable(BAD_RESPONSE)
            return
        self._attempt = None  # the attempt is over: its connection carries the body to the relay
        self._relay = relay
        attempt.conn.deliver_body(relay)

    # -- the response ---------------------------------------------------------

    def _start_relay(self, attempt: _Attempt, status: int, reason: bytes, headers: RawHeaders,
                     length: int | None) -> BodyRelay:
        request = self._request
        request.setResponseCode(status, reason)
        out = request.responseHeaders
        for name, values in downstream_response_headers(headers):
            out.setRawHeaders(name, values)
        out.setRawHeaders(b"X-Blyan-Node", [attempt.lease.node.name_bytes])
        out.setRawHeaders(b"X-Blyan-Attempts", [b"%d" % self._failover.count])
        out.setRawHeaders(REQUEST_ID_HEADER, [self._tally.request_id.encode("ascii")])
        content_type = (out.getRawHeaders(b"content-type") or [b""])[0].lower()
        is_sse = content_type.startswith(b"text/event-stream")
        if is_sse and not out.hasHeader(b"x-accel-buffering"):
            out.setRawHeaders(b"X-Accel-Buffering", [b"no"])
        if self._method == b"HEAD" or status == 304:
            # No body follows, but the length a GET would have had is the node's to tell.
            declared = [v for n, vs in headers if n.lower() == b"content-length" for v in vs]
            if declared:
                out.setRawHeaders(b"Content-Length", declared[:1])
        elif length is not None and status != 204:
            out.setRawHeaders(b"Content-Length", [b"%d" % length])
        conn = attempt.conn
        raw_chunks = conn.chunked and request.clientproto == b"HTTP/1.1"
        sse = is_sse and length is None  # comments and error events would break a body of announced length
        dialect, request_id = error_dialect(request.uri), self._tally.request_id
        relay = BodyRelay(
            request,
            self._context.clock,
            conn,
            idle_timeout=self._rules.idle_timeout,
            sse_keepalive=self._rules.sse_keepalive,
            is_sse=sse,
            on_end=functools.partial(self._relay_ended, attempt.lease, sse),
            raw_chunks=conn if raw_chunks else None,
            ndjson=length is None and content_type.startswith(b"application/x-ndjson"),
            error_document=lambda code, message: ProxyError(502, code, message).body(dialect, request_id),
        )
        relay.start()
        if raw_chunks:
            conn.pass_chunks_raw()
        if sse:
            self._context.traffic.stream("sse", +1)
        return relay

    def _relay_ended(self, lease: Lease, sse: bool, how: str, bytes_sent: int) -> None:
        lease.release()
        if sse:
            self._context.traffic.stream("sse", -1)
        if how not in (COMPLETE, CLIENT_GONE):
            log.warn("stream from node {node} ended: {how}", node=lease.node.name, how=how)
        self._tally.bytes_out = bytes_sent
        if self._relay is not None:
            usage = self._relay.usage_tail.usage()
            if usage is not None:
                self._tally.tokens_in, self._tally.tokens_out = usage.tokens_in, usage.tokens_out
        self._tally.end(self._request.code, _ENDINGS[how])
        self._let_go()

    def _fail(self, err: ProxyError) -> None:
        if not self._client_gone:
            write_error(self._request, err)
            self._tally.bytes_out = self._request.sentLength  # the proxy's own answer's body
        self._tally.end(err.status, traffic.ended_by(err))
        self._let_go()

    def _let_go(self) -> None:
        """The exchange is over: its failover and relay hold it by their callbacks, and it holds them.

        Those cycles are cut here, so the exchange and its parts are freed by
        reference counting at once instead of by the cycle collector later.
        """
        self._failover.let_go()
        self._relay = None

    def _on_client_gone(self, failure: Failure) -> None:
        self._client_gone = True
        self._failover.cancel()  # RETRY_DELAY_MS if it runs, and the watch on the attempt's node
        if self._relay is not None:
            self._relay.client_gone()
        elif self._pending is not None:
            self._pending.cancel()  # ``_connect_failed`` releases the lease
        elif self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.abort()
            attempt.lease.release()
        if self._relay is None:
            self._tally.end(traffic.CLIENT_CLOSED_STATUS, traffic.CLIENT_GONE)


class _Attempt:
    """One attempt's request on its connection, until the response head arrives or ``PROXY_TIMEOUT`` passes.

    It is what the connection reports the head to, and it tells its exchange.
    The exchange then relays the answer, handing the body to a ``BodyRelay``
    (``deliver_body``), or drops the connection: no body ever comes here.
    """

    def __init__(self, exchange: Exchange, lease: Lease, conn: UpstreamConnection, clock: IReactorTime,
                 timeout: float) -> None:
        self.lease = lease
        self.conn = conn
        self._exchange = exchange
        self.sent_at = clock.seconds()
        conn.deadline.arm(timeout, self._timed_out)  # the connection's own timer, not one per attempt
        self._waiting = True

    def send(self, method: bytes, head: bytes, body: bytes) -> None:
        """Send the request (``head`` serialised); the head of its answer comes here."""
        self.conn.request(method, head, body, cast(BodyReceiver, self))  # the head part only: see the class

    def abort(self) -> None:
        """Drop the connection: its answer is not wanted."""
        self._stop_waiting()
        self.conn.abort()

    def request_failed(self, reason: Failure | ProtocolError) -> None:
        """No response head came (``BodyReceiver``): the exchange fails over."""
        self._stop_waiting()
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        self._exchange.attempt_failed(classify_failure(failure), self.conn.reused, self.conn.bytes_received)

    def response_started(self, status: int, reason: bytes, headers: RawHeaders, length: int | None) -> None:
        """The response head arrived (``BodyReceiver``): the exchange decides what becomes of it."""
        self._stop_waiting()
        self._exchange.answer_started(self, status, reason, headers, length)

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self.conn.deadline.disarm()

    def _timed_out(self) -> None:
        self._waiting = False
        self.conn.abort()
        self._exchange.attempt_failed(RESPONSE_TIMEOUT)
