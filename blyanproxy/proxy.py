"""The forwarding resource: every request that is not for the proxy itself goes to a node.

One ``Exchange`` carries one client request: it picks a node through the
``Balancer``, sends the request with the pooled ``Agent``, fails over to
another node while nothing has reached the client yet, and then hands the body
to a ``BodyRelay``.
"""

from __future__ import annotations

from typing import Optional, Set

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web._newclient import RequestNotSent, RequestTransmissionFailed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .balancer import Balancer, Lease
from .config import Settings
from .errors import ProxyError, write_error
from .headers import client_facts, downstream_response_headers, upstream_request_headers
from .relay import CLIENT_GONE, BodyRelay
from .routing import Route, parse_route
from .upstream import body_producer
from .websocket import WebSocketForwarder, is_websocket_upgrade
from .logs import logger

log = logger("proxy")


def classify_failure(failure) -> tuple:
    """``(reason, error)`` for a failed attempt: a short reason word and the client's error.

    Every such failure happened before any byte reached the client, so each may
    fail over to another node.
    """
    value = failure.value
    if isinstance(value, defer.TimeoutError):
        return "response_timeout", ProxyError(504, "upstream_timeout", "the node did not answer in time")
    if isinstance(value, error.TimeoutError):
        return "connect_timeout", ProxyError(504, "upstream_timeout", "connecting to the node timed out")
    if isinstance(value, error.ConnectionRefusedError):
        return "refused", ProxyError(502, "upstream_unreachable", "the node refused the connection")
    if isinstance(value, (error.DNSLookupError, error.ConnectError)):
        return "connect_failed", ProxyError(502, "upstream_unreachable", "the node could not be reached")
    if isinstance(value, (ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent)):
        reasons = getattr(value, "reasons", [])
        if any("SSL" in type(r.value).__module__ for r in reasons):
            return "tls_failed", ProxyError(502, "upstream_tls", "the TLS handshake with the node failed")
        return "no_response", ProxyError(502, "upstream_failed", "the node closed the connection without answering")
    if isinstance(value, ResponseFailed):
        return "upstream_broke", ProxyError(502, "upstream_failed", "the node's response broke off")
    return "upstream_error", ProxyError(502, "upstream_failed", "the request to the node failed")


def _timed_out(result, timeout: float):
    """Whatever a cancelled attempt failed with, a timeout is what happened."""
    return Failure(defer.TimeoutError(f"no response headers within {timeout:g} s"))


class _Discard(Protocol):
    """Reads a response body to its end and drops it (keeps the connection reusable)."""

    def connectionLost(self, reason) -> None:
        pass


class _Abort(Protocol):
    """Closes the connection of a response nobody wants any more."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class Exchange:
    """One client request on its way through the proxy: attempts, failover and relay."""

    def __init__(self, forwarder: "ProxyResource", request, route: Route) -> None:
        self._forwarder = forwarder
        self._settings = forwarder.settings
        self._request = request
        self._route = route
        self._method = request.method
        request.content.seek(0)
        self._body = request.content.read()
        self._excluded: Set[str] = set()
        self._attempts = 0
        self._pending: Optional[defer.Deferred] = None
        self._relay: Optional[BodyRelay] = None
        self._lease: Optional[Lease] = None
        self._client_gone = False
        self._done = False
        self._client = client_facts(request)
        request.notifyFinish().addErrback(self._on_client_gone)

    def start(self) -> None:
        """Send the first attempt."""
        self._attempt(None)

    # -- attempts -------------------------------------------------------------

    def _attempt(self, last_error: Optional[ProxyError]) -> None:
        lease = None
        if self._attempts < self._settings.max_attempts:
            lease = self._forwarder.balancer.acquire(self._route, frozenset(self._excluded))
        if lease is None:
            self._fail(last_error or self._forwarder.no_node_error())
            return
        self._send(lease)

    def _send(self, lease: Lease) -> None:
        self._attempts += 1
        self._excluded.add(lease.node.id)
        self._lease = lease
        node = lease.node
        url = (node.url.scheme + "://" + node.url.netloc + node.url.path).encode("ascii")
        headers = upstream_request_headers(
            self._request.requestHeaders.getAllRawHeaders(),
            node.url.netloc.encode("ascii"),
            self._client,
            trust_forwarded=self._settings.trust_forwarded,
            strip_origin=self._settings.strip_origin,
        )
        d = self._forwarder.agent.request(
            self._method,
            url + self._route.upstream_target,
            Headers(dict(headers)),
            body_producer(self._method, self._body),
        )
        d.addTimeout(self._settings.proxy_timeout, self._forwarder.clock, onTimeoutCancel=_timed_out)
        self._pending = d
        d.addCallbacks(self._on_response, self._on_failure, callbackArgs=(lease,), errbackArgs=(lease,))

    def _on_failure(self, failure, lease: Lease) -> None:
        self._pending = None
        if self._client_gone:
            lease.release()
            return
        reason, err = classify_failure(failure)
        log.info(
            "attempt {attempt} on node {node} failed: {reason}",
            attempt=self._attempts, node=lease.node.name, reason=reason,
        )
        lease.failed(reason)
        self._attempt(err)

    def _on_response(self, response, lease: Lease) -> None:
        self._pending = None
        if self._client_gone:
            response.deliverBody(_Abort())
            lease.release()
            return
        if response.code in self._settings.retry_on_status and self._attempts < self._settings.max_attempts:
            following = self._forwarder.balancer.acquire(self._route, frozenset(self._excluded))
            if following is not None:
                log.info(
                    "node {node} answered {status}; failing over",
                    node=lease.node.name, status=response.code,
                )
                response.deliverBody(_Discard())
                lease.failed("status_%d" % response.code)
                self._send(following)
                return
        lease.responded()
        self._relay_response(response, lease)

    # -- the response ---------------------------------------------------------

    def _relay_response(self, response, lease: Lease) -> None:
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in downstream_response_headers(response.headers.getAllRawHeaders()):
            out.setRawHeaders(name, values)
        out.setRawHeaders(b"X-Blyan-Node", [lease.node.name.encode("utf-8", "replace")])
        out.setRawHeaders(b"X-Blyan-Attempts", [b"%d" % self._attempts])
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        is_sse = content_type.lower().startswith(b"text/event-stream")
        if is_sse and not out.hasHeader(b"x-accel-buffering"):
            out.setRawHeaders(b"X-Accel-Buffering", [b"no"])
        length = response.length
        if isinstance(length, int) and self._method != b"HEAD" and response.code not in (204, 304):
            out.setRawHeaders(b"Content-Length", [b"%d" % length])
        self._relay = BodyRelay(
            request,
            self._forwarder.clock,
            idle_timeout=self._settings.idle_timeout,
            sse_keepalive=self._settings.sse_keepalive,
            is_sse=is_sse,
            on_end=self._on_relay_end,
        )
        response.deliverBody(self._relay)

    def _on_relay_end(self, how: str) -> None:
        self._done = True
        if self._lease is not None:
            self._lease.release()
        if how not in ("complete", CLIENT_GONE):
            log.warn("stream from node {node} ended: {how}", node=self._lease.node.name, how=how)

    def _fail(self, err: ProxyError) -> None:
        self._done = True
        if not self._client_gone:
            write_error(self._request, err)

    def _on_client_gone(self, failure) -> None:
        self._client_gone = True
        if self._pending is not None:
            self._pending.cancel()
        elif self._relay is not None:
            self._relay.client_gone()


class ProxyResource(Resource):
    """The twisted.web resource that forwards requests to nodes (a leaf: it sees every path)."""

    isLeaf = True

    def __init__(self, balancer: Balancer, agent, endpoints, clock, settings: Settings) -> None:
        super().__init__()
        self.balancer = balancer
        self.agent = agent
        self.clock = clock
        self.settings = settings
        self._websockets = WebSocketForwarder(self, endpoints)

    def no_node_error(self) -> ProxyError:
        """The 503 for a request no node can take."""
        return ProxyError(
            503,
            "no_healthy_nodes",
            "no healthy node can take the request",
            retry_after=max(1, int(self.settings.health_interval + 0.999)),
        )

    def render(self, request):
        request.defaultContentType = None
        try:
            route = parse_route(request.uri)
        except ProxyError as err:
            write_error(request, err)
            return NOT_DONE_YET
        if is_websocket_upgrade(request):
            self._websockets.forward(request, route)
        else:
            Exchange(self, request, route).start()
        return NOT_DONE_YET
