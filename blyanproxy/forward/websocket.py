"""WebSocket forwarding: the handshake goes to a node, then the two sockets are spliced.

The proxy does not speak WebSocket itself. It sends the client's upgrade request to a node
over a fresh connection and reads the node's answer head. On a ``101 Switching Protocols``
that completes the handshake for the client's key (``core.handshake_problem``:
``Upgrade: websocket``, ``Connection: upgrade``, the right ``Sec-WebSocket-Accept``; any
other 101 is a 502) it writes the node's head filtered like any response head, takes over
the client's raw transport (``twistedinternals.take_over_connection``, the hook Twisted's
own WebSocket resource uses) and copies bytes both ways, each side registered as the
other's producer so neither direction buffers without bound. Any other answer is relayed
as an ordinary HTTP response. The node is chosen and failed over like any request's
(``failover.Failover``: a node that cannot be reached or stays silent past
``PROXY_TIMEOUT``); its answer, whatever the status, goes to the client. The request's
tally gets the bytes each way after the upgrade and how the WebSocket ended
(``client_closed``, ``node_closed``).
"""

from __future__ import annotations

import typing
from typing import Callable, cast

from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.server import Request

from blyanproxy.core import (
    CONNECT_TIMEOUT,
    NO_RESPONSE,
    REQUEST_ID_HEADER,
    UPGRADE_TIMEOUT,
    Attempts,
    ProxyError,
    RawHeaders,
    Route,
    bad_handshake,
    downstream_response_headers,
    handshake_problem,
    replace_headers,
    route_target,
    upstream_request_headers,
    write_error,
)
from blyanproxy.fleet import Lease, LeasePool
from blyanproxy.forward import traffic
from blyanproxy.forward.context import ForwardContext
from blyanproxy.forward.failover import Failover, classify_failure
from blyanproxy.forward.keepalive import enable_keepalive_probes
from blyanproxy.forward.relay import cut_short
from blyanproxy.twistedinternals import BodyDecoder, body_decoder, take_over_connection
from blyanproxy.upstream import (
    ProtocolError,
    body_framing,
    connect_quietly,
    parse_head,
    serialize_request_head,
    serialize_response_head,
)

_MAX_HEAD = 64 * 1024


def is_websocket_upgrade(request: Request) -> bool:
    """True for an HTTP/1.1 ``GET`` asking to upgrade to ``websocket``."""
    if request.method != b"GET" or request.clientproto != b"HTTP/1.1":
        return False
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade") or []
    return any(b"websocket" in value.lower() for value in upgrade)


def forward_websocket(context: ForwardContext, request: Request, tally: traffic.RequestTally, route: Route,
                      pool: LeasePool) -> None:
    """Forward one upgrade request to a node of ``pool``; ``tally`` hears how it ends."""
    _Handshake(context, request, tally, route, pool).start()


class _SpliceTransport(typing.Protocol):
    """What the splice uses of either side's transport: TCP, or TLS over TCP, each a producer and a
    consumer (which Twisted's ``Protocol.transport: ITransport | None`` cannot say)."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: _SpliceTransport, streaming: bool) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class _ClientSide(Protocol):
    """The client's raw connection after the upgrade: bytes go to the node (``released``: see connectionLost)."""

    def __init__(self, splice: _Splice, node: _SpliceTransport, released: Callable[[], None]) -> None:
        self._splice = splice
        self._node = node
        self._released = released

    def connectionMade(self) -> None:
        """Keep the transport, as what it is (the upgrade hands over the channel's)."""
        self.link = cast(_SpliceTransport, self.transport)

    def dataReceived(self, data: bytes) -> None:
        """The client's bytes: on to the node."""
        self._splice.tally.bytes_in += len(data)
        self._node.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The client closed: so does the node's side; the channel it was taken from gives back what it
        held (``serve.ProxyChannel.released``: the upgrade replaced its own connectionLost)."""
        self._released()
        self._splice.client_lost(reason)


class _Splice(Protocol):
    """The node's connection: handshake answer first, then raw bytes to the client."""

    def __init__(self, handshake: _Handshake, lease: Lease, head: bytes) -> None:
        self._handshake = handshake
        self._lease = lease
        self._request_head = head
        self._request = handshake.request
        self.tally = handshake.tally
        self._answer = b""
        self._client: _SpliceTransport | None = None  # once spliced
        self._decoder: BodyDecoder | None = None
        self._ended = False

    def connectionMade(self) -> None:
        """Keep the transport, as what it is, and send the upgrade request."""
        self._node = cast(_SpliceTransport, self.transport)
        self._node.write(self._request_head)

    def abort(self) -> None:
        """Drop the node's connection."""
        self._node.abortConnection()

    def abandon(self) -> None:
        """Drop the node's connection before its answer, reporting nothing of it (the node went out)."""
        self._ended = True
        self._node.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """The node's bytes: its handshake answer, then the WebSocket (or a refusal's body)."""
        client = self._client
        if client is not None:
            self.tally.bytes_out += len(data)
            client.write(data)
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
        if status != 101:
            self._relay_refusal(status, reason, headers, rest)
            return
        problem = handshake_problem(self._request.requestHeaders.getRawHeaders(b"sec-websocket-key", []), headers)
        if problem is not None:
            self._give_up(f"the node's 101 is not a WebSocket handshake: {problem}")
        else:
            self._splice(headers, rest)

    def _splice(self, headers: RawHeaders, rest: bytes) -> None:
        request = self._request
        client = _ClientSide(self, self._node, getattr(request.channel, "released", lambda: None))
        take_over_connection(request.channel, client)
        self._client = client.link
        client.link.write(self._switched_head(headers) + rest)
        self.tally.bytes_out += len(rest)
        request.registerProducer(self._node, True)
        self._node.registerProducer(client.link, True)
        context = self._handshake.context
        heartbeat = context.rules.ws_heartbeat
        if heartbeat:
            for transport in (client.link, self._node):
                enable_keepalive_probes(transport, heartbeat)
        context.traffic.stream("websocket", +1)

    def _switched_head(self, headers: RawHeaders) -> bytes:
        """The client's 101 head: the node's end-to-end headers, the upgrade, and who answered."""
        kept = downstream_response_headers(headers)
        upgrade = [
            (b"Upgrade", [b"websocket"]), (b"Connection", [b"Upgrade"]), (b"X-Blyan-Node", [self._node_name()]),
            (REQUEST_ID_HEADER, [self.tally.request_id.encode("ascii")]),
        ]
        return serialize_response_head(101, b"Switching Protocols", kept + upgrade)

    def _node_name(self) -> bytes:
        return self._lease.node.name.encode("utf-8", "replace")

    def _relay_refusal(self, status: int, reason: bytes, headers: RawHeaders, rest: bytes) -> None:
        request = self._request
        request.setResponseCode(status, reason or None)
        for name, values in downstream_response_headers(headers):
            request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"X-Blyan-Node", [self._node_name()])
        request.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [self.tally.request_id.encode("ascii")])
        try:
            framing, length = body_framing(b"GET", status, b"HTTP/1.1", headers)
        except ProtocolError:
            framing, length = "close", None
        declared = length if framing == "length" else None  # the body's length, when Content-Length gives it
        if framing == "none" or declared == 0:
            if declared == 0:
                request.responseHeaders.setRawHeaders(b"Content-Length", [b"0"])
            self._refusal_done()
            return
        if declared is not None:
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % declared])
        self._decoder = body_decoder(declared, framing == "chunked", self._write_refusal, self._refusal_done)
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
            self._node.loseConnection()
            self._lease.release()
            self.tally.end(self._request.code, traffic.COMPLETE)

    def _give_up(self, message: str) -> None:
        self._ended = True
        self._node.abortConnection()
        self._handshake.unusable(message)

    def client_lost(self, reason: Failure) -> None:
        """The client's side of the spliced WebSocket closed: close the node's, and end the upgrade request."""
        if self._websocket_ended(traffic.CLIENT_CLOSED):
            self._node.loseConnection()
        # The channel no longer tells its request (the upgrade took its connectionLost):
        # tell it here, so whoever waits on notifyFinish learns the WebSocket ended.
        if self._request.channel is not None:
            self._request.connectionLost(reason)

    def _websocket_ended(self, ended: str) -> bool:
        """The spliced WebSocket ended as ``ended`` says: True the first time, when the other side is to close."""
        if self._ended:
            return False
        self._ended = True
        self._lease.release()
        self._handshake.context.traffic.stream("websocket", -1)
        self.tally.end(101, ended)
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The node's connection closed: after the splice, the client's closes too."""
        client = self._client
        if client is not None:
            if self._websocket_ended(traffic.NODE_CLOSED):
                client.loseConnection()
        elif self._decoder is not None:
            try:
                self._decoder.noMoreData()
            except Exception:  # the body was cut short: the client sees a broken response
                if self._request.channel is not None:
                    cut_short(self._request)
                self._ended = True
                self._lease.release()
                self.tally.end(self._request.code, traffic.UPSTREAM_BROKE)
            else:
                self._refusal_done()
        elif not self._ended:
            self._ended = True
            self._handshake.lost_before_answer(self._lease)


class _Handshake:
    """One client's upgrade request: tries nodes (``Failover``) until one answers."""

    def __init__(self, context: ForwardContext, request: Request, tally: traffic.RequestTally, route: Route,
                 pool: LeasePool) -> None:
        self.context = context
        self.request = request
        self.tally = tally
        self._route = route
        self._failover = Failover(Attempts(context.rules.attempts), pool, route, context.clock,
                                  tally, self._try_node, self.fail, self._abandon_attempt)
        self._pending: defer.Deferred[_Splice] | None = None
        self._timeout: IDelayedCall | None = None
        self._splice: _Splice | None = None  # the current attempt's, once connected
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
        headers = replace_headers(headers, self.tally.node_headers)
        head = serialize_request_head(b"GET", url.path_bytes + route_target(self._route, lease.engine), headers)
        endpoint = self.context.endpoints.endpoint(url.scheme, url.host, url.port)
        splice = _Splice(self, lease, head)
        pending = connect_quietly(endpoint, splice)
        self._pending = pending
        pending.addCallbacks(self._connected, self._connect_failed, errbackArgs=(lease,))
        self._timeout = self.context.clock.callLater(rules.proxy_timeout, self._timed_out, splice)

    def _connected(self, splice: _Splice) -> None:
        self._pending = None
        self._splice = splice
        if self._client_gone:
            splice.abort()

    def _connect_failed(self, failure: Failure, lease: Lease) -> None:
        self._pending = None
        if self._client_gone:
            lease.release()  # the client left, cancelling the connection: nothing is held against the node
            return
        if failure.check(defer.CancelledError, ConnectingCancelledError):
            return  # the timeout cancelled it and reports the attempt
        self._cancel_timeout()
        self._failover.failed(classify_failure(failure))

    def _abandon_attempt(self) -> None:
        """The current attempt's node went out while it waited (the failover tells): drop the attempt."""
        self._cancel_timeout()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()  # ``_connect_failed`` lets a cancelled connection go unreported
        elif self._splice is not None:
            self._splice.abandon()

    def answered(self) -> None:
        """The node sent its handshake answer; whatever it is, it goes to the client."""
        self._cancel_timeout()
        self._failover.settled()
        self._answered = True
        self.tally.ttfb = self.context.clock.seconds() - self.tally.started

    def unusable(self, message: str) -> None:
        """The node's handshake answer cannot be read: answer 502, no failover."""
        self._failover.unusable(bad_handshake(message))

    def lost_before_answer(self, lease: Lease) -> None:
        """The node's connection (``lease``'s) closed before its handshake answer: try the next node."""
        self._cancel_timeout()  # this attempt's: the next has a deadline of its own
        if self._client_gone:
            lease.release()
        else:
            self._failover.failed(UPGRADE_TIMEOUT if self._timed_out_waiting else NO_RESPONSE)

    def _timed_out(self, splice: _Splice) -> None:
        self._timeout = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
            self._failover.failed(CONNECT_TIMEOUT)
        else:
            self._timed_out_waiting = True
            splice.abort()

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

    def _on_client_gone(self, failure: Failure) -> None:
        self._client_gone = True
        self._cancel_timeout()
        self._failover.cancel()
        self.tally.end(self.request.code if self._answered else traffic.CLIENT_CLOSED_STATUS, traffic.CLIENT_GONE)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()  # ``_connect_failed`` releases the lease
        elif self._splice is not None and not self._answered:
            self._splice.abort()
