"""WebSocket forwarding: the handshake goes to a node, then the two sockets are spliced.

The proxy does not speak WebSocket itself. It sends the client's upgrade
request to a node over a fresh connection and reads the node's answer head.
On ``101 Switching Protocols`` it takes over the client's raw transport
(``twistedinternals.take_over_connection``, the hook Twisted's own
WebSocket resource uses) and copies bytes both ways, each side registered as
the other's producer so neither direction buffers without bound. Any other
answer is relayed as an ordinary HTTP response. The node is chosen and
failed over like any request's (``failover.Failover``: a node that cannot be
reached or stays silent past ``PROXY_TIMEOUT``); its answer, whatever the
status, goes to the client. The request's tally gets the bytes each way
after the upgrade and how the WebSocket ended (``client_closed``,
``node_closed``).
"""

from __future__ import annotations

import socket

from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Protocol

from blyanproxy.core import (
    CONNECT_TIMEOUT,
    NO_RESPONSE,
    UPGRADE_TIMEOUT,
    Attempts,
    ProxyError,
    Route,
    bad_handshake,
    downstream_response_headers,
    upstream_request_headers,
    write_error,
)
from blyanproxy.fleet import Lease, LeasePool
from blyanproxy.forward import traffic
from blyanproxy.forward.context import ForwardContext
from blyanproxy.forward.failover import Failover, classify_failure
from blyanproxy.twistedinternals import BodyDecoder, body_decoder, take_over_connection
from blyanproxy.upstream import ProtocolError, body_framing, connect_quietly, parse_head, serialize_request_head

_MAX_HEAD = 64 * 1024


def is_websocket_upgrade(request) -> bool:
    """True for an HTTP/1.1 ``GET`` asking to upgrade to ``websocket``."""
    if request.method != b"GET" or request.clientproto != b"HTTP/1.1":
        return False
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade") or []
    return any(b"websocket" in value.lower() for value in upgrade)


def enable_keepalive_probes(transport, idle: float) -> None:
    """Turn on TCP keep-alive probes after ``idle`` quiet seconds, so a vanished peer is noticed.

    The probes work below WebSocket framing, which the proxy passes through
    untouched. ``transport`` may be TLS over TCP; the TCP one is found below it.
    """
    while transport is not None and not hasattr(transport, "setTcpKeepAlive"):
        transport = getattr(transport, "transport", None)
    if transport is None:
        return
    transport.setTcpKeepAlive(True)
    sock = transport.getHandle()
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(idle / 3, 1)), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), max(int(value), 1))


def forward_websocket(context: ForwardContext, request, tally: traffic.RequestTally, route: Route,
                      pool: LeasePool) -> None:
    """Forward one upgrade request to a node of ``pool``; ``tally`` hears how it ends."""
    _Handshake(context, request, tally, route, pool).start()


class _ClientSide(Protocol):
    """The client's raw connection after the upgrade: bytes go to the node."""

    def __init__(self, splice: _Splice) -> None:
        self._splice = splice

    def dataReceived(self, data: bytes) -> None:
        self._splice.tally.bytes_in += len(data)
        self._splice.transport.write(data)

    def connectionLost(self, reason) -> None:
        self._splice.closed("client")
        # The channel no longer tells its request (the upgrade took its connectionLost):
        # tell it here, so whoever waits on notifyFinish learns the WebSocket ended.
        self._splice.client_request_lost(reason)


class _Splice(Protocol):
    """The node's connection: handshake answer first, then raw bytes to the client."""

    def __init__(self, handshake: _Handshake, lease: Lease, head: bytes) -> None:
        self._handshake = handshake
        self._lease = lease
        self._request_head = head
        self._request = handshake.request
        self.tally = handshake.tally
        self._answer = b""
        self._spliced = False
        self._decoder: BodyDecoder | None = None
        self._ended = False
        self._client: _ClientSide | None = None

    def connectionMade(self) -> None:
        self.transport.write(self._request_head)

    def dataReceived(self, data: bytes) -> None:
        if self._spliced:
            self.tally.bytes_out += len(data)
            self._request.transport.write(data)
        elif self._decoder is not None:
            self._decoder.dataReceived(data)
        else:
            self._read_head(data)

    def _read_head(self, data: bytes) -> None:
        self._answer += data
        end = self._answer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._answer) > _MAX_HEAD:
                self._give_up("the node's handshake answer is too large")
            return
        head, rest = self._answer[:end], self._answer[end + 4 :]
        try:
            status, reason, headers = parse_head(head)
        except ProtocolError as exc:
            self._give_up(f"the node's handshake answer is malformed: {exc}")
            return
        self._handshake.answered()
        if status == 101:
            self._splice(head, rest)
        else:
            self._relay_refusal(status, reason, headers, rest)

    def _splice(self, head: bytes, rest: bytes) -> None:
        request = self._request
        self._spliced = True
        client = _ClientSide(self)
        take_over_connection(request.channel, client)
        client.transport.write(head + b"\r\nX-Blyan-Node: " + self._node_name() + b"\r\n\r\n" + rest)
        self.tally.bytes_out += len(rest)
        request.registerProducer(self.transport, True)
        self.transport.registerProducer(client.transport, True)
        self._client = client
        context = self._handshake.context
        heartbeat = context.rules.ws_heartbeat
        if heartbeat:
            for transport in (client.transport, self.transport):
                enable_keepalive_probes(transport, heartbeat)
        context.traffic.stream("websocket", +1)

    def _node_name(self) -> bytes:
        return self._lease.node.name.encode("utf-8", "replace")

    def _relay_refusal(self, status: int, reason: bytes, headers, rest: bytes) -> None:
        request = self._request
        request.setResponseCode(status, reason or None)
        for name, values in downstream_response_headers(headers):
            request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"X-Blyan-Node", [self._node_name()])
        try:
            framing, length = body_framing(b"GET", status, b"HTTP/1.1", headers)
        except ProtocolError:
            framing, length = "close", None
        if framing == "none" or (framing == "length" and not length):
            if framing == "length":
                request.responseHeaders.setRawHeaders(b"Content-Length", [b"0"])
            self._refusal_done()
            return
        if framing == "length":
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % length])
        self._decoder = body_decoder(length if framing == "length" else None, framing == "chunked",
                                     self._write_refusal, self._refusal_done)
        if rest:
            self._decoder.dataReceived(rest)

    def _write_refusal(self, data: bytes) -> None:
        self.tally.bytes_out += len(data)
        self._request.write(data)

    def _refusal_done(self, extra: bytes = b"") -> None:
        if not self._ended:
            self._ended = True
            if self._request.channel is not None:
                self._request.finish()
            self.transport.loseConnection()
            self._lease.release()
            self.tally.end(self._request.code, traffic.COMPLETE)

    def _give_up(self, message: str) -> None:
        self._ended = True
        self.transport.abortConnection()
        self._handshake.unusable(message)

    def client_request_lost(self, reason) -> None:
        """The client's connection is gone: end its upgrade request."""
        if self._request.channel is not None:
            self._request.connectionLost(reason)

    def closed(self, side: str) -> None:
        """One side (``"client"`` or ``"node"``) of the spliced WebSocket closed: close the other, once."""
        if self._ended:
            return
        self._ended = True
        self._lease.release()
        self._handshake.context.traffic.stream("websocket", -1)
        self.tally.end(101, traffic.CLIENT_CLOSED if side == "client" else traffic.NODE_CLOSED)
        if side == "client":
            self.transport.loseConnection()
        else:
            self._client.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self._spliced:
            self.closed("node")
        elif self._decoder is not None:
            try:
                self._decoder.noMoreData()
            except Exception:  # the body was cut short: the client sees a broken response
                if self._request.channel is not None:
                    self._request.transport.loseConnection()
                self._ended = True
                self._lease.release()
                self.tally.end(self._request.code, traffic.UPSTREAM_BROKE)
            else:
                self._refusal_done()
        elif not self._ended:
            self._ended = True
            self._handshake.lost_before_answer()


class _Handshake:
    """One client's upgrade request: tries nodes (``Failover``) until one answers."""

    def __init__(self, context: ForwardContext, request, tally: traffic.RequestTally, route: Route,
                 pool: LeasePool) -> None:
        self.context = context
        self.request = request
        self.tally = tally
        self._route = route
        self._failover = Failover(Attempts(context.rules.attempts), pool, route, context.clock,
                                  context.traffic, self._try_node, self.fail)
        self._lease: Lease | None = None
        self._pending: defer.Deferred | None = None
        self._timeout = None
        self._splice: _Splice | None = None
        self._answered = False
        self._timed_out_waiting = False
        self._client_gone = False
        request.notifyFinish().addErrback(self._on_client_gone)

    def start(self) -> None:
        """Make the first attempt."""
        self._failover.start()

    def _try_node(self, lease: Lease, fresh: bool) -> None:
        """Send the upgrade to ``lease``'s node (always on a connection of its own)."""
        rules = self.context.rules
        self._lease = lease
        self.tally.node = lease.node.name
        self.tally.attempts = self._failover.count
        self._splice = None
        self._timed_out_waiting = False
        url = lease.node.url
        headers = upstream_request_headers(
            self.request.requestHeaders.getAllRawHeaders(),
            url.netloc.encode("ascii"),
            self.tally.client,
            trust_forwarded=rules.trust_forwarded,
            strip_origin=rules.strip_origin,
            websocket=True,
        )
        head = serialize_request_head(b"GET", url.path_bytes + self._route.upstream_target, headers)
        endpoint = self.context.endpoints.endpoint(url.scheme, url.host, url.port)
        self._pending = connect_quietly(endpoint, _Splice(self, lease, head))
        self._pending.addCallbacks(self._connected, self._connect_failed)
        self._timeout = self.context.clock.callLater(rules.proxy_timeout, self._timed_out)

    def _connected(self, splice: _Splice) -> None:
        self._pending = None
        self._splice = splice
        if self._client_gone:
            splice.transport.abortConnection()

    def _connect_failed(self, failure) -> None:
        self._pending = None
        if failure.check(defer.CancelledError, ConnectingCancelledError):
            return  # whoever cancelled does the accounting
        self._cancel_timeout()
        self._failover.failed(classify_failure(failure))

    def answered(self) -> None:
        """The node sent its handshake answer; whatever it is, it goes to the client."""
        self._cancel_timeout()
        self._answered = True
        self.tally.ttfb = self.context.clock.seconds() - self.tally.started

    def unusable(self, message: str) -> None:
        """The node's handshake answer cannot be read: answer 502, no failover."""
        self._failover.unusable(bad_handshake(message))

    def lost_before_answer(self) -> None:
        """The node's connection closed before its handshake answer: try the next node."""
        if self._client_gone:
            self._lease.release()
        else:
            self._failover.failed(UPGRADE_TIMEOUT if self._timed_out_waiting else NO_RESPONSE)

    def _timed_out(self) -> None:
        self._timeout = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
            self._failover.failed(CONNECT_TIMEOUT)
        else:
            self._timed_out_waiting = True
            self._splice.transport.abortConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def fail(self, err: ProxyError) -> None:
        """Answer the client with an error."""
        self._cancel_timeout()
        if not self._client_gone and self.request.channel is not None:
            write_error(self.request, err)
            self.tally.bytes_out = self.request.sentLength  # the proxy's own answer's body
        self.tally.end(err.status, traffic.ended_by(err))

    def _on_client_gone(self, failure) -> None:
        self._client_gone = True
        self._cancel_timeout()
        self._failover.cancel()
        self.tally.end(self.request.code if self._answered else traffic.CLIENT_CLOSED_STATUS, traffic.CLIENT_GONE)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
            self._lease.release()
        elif self._splice is not None and not self._answered:
            self._splice.transport.abortConnection()
