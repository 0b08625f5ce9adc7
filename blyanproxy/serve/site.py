"""The listening side: the request class, the root resource and the ``Site``."""

from __future__ import annotations

from typing import Callable, cast

from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from blyanproxy.core import (
    DeadlineClock,
    ForwardTrust,
    LazyDeadline,
    ProxyError,
    check_path,
    unfit_request_headers,
)
from blyanproxy.forward import CLIENT_CLOSED_STATUS, CLIENT_GONE, COMPLETE, RequestTally, TrafficRecorder
from blyanproxy.logs import logger
from blyanproxy.serve.drain import TrackedConnection
from blyanproxy.serve.limits import BodyBudget, ConnectionCounts
from blyanproxy.serve.refusals import (
    AMBIGUOUS_FRAMING,
    BODIES_BUSY,
    BODY_TIMEOUT,
    CONTROL_IN_HEADER,
    HEAD_TIMEOUT,
    MALFORMED,
    TOO_MANY_CONNECTIONS,
    Sink,
    body_too_large,
    early_refusal,
    peer_host,
)
from blyanproxy.twistedinternals import ChannelWithBadRequestHook, channel_protocol

log = logger("server")


#: Defaults of the client limits (the settings' defaults).
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256
NO_PEERS = ForwardTrust()


class ProxyRequest(server.Request):
    """A request that refuses an oversized body as soon as its size is known.

    A head with an ambiguous ``Transfer-Encoding`` or a header value holding a
    control character is refused with the JSON 400 before anything else. A
    declared ``Content-Length`` over the site's ``max_body_bytes`` is answered
    413 before the body is read; a chunked body is refused the moment it
    passes the limit. A body is held against the site's ``body_budget``
    (``MAX_BUFFERED_BYTES``; 503 beyond it) until the request ends, and must
    arrive whole within ``body_timeout`` seconds of the head (408 after).
    Either way the connection closes and nothing is kept.
    """

    channel: ProxyChannel  # a ProxySite serves every request on one of its ProxyChannels
    _refused = False
    _received = 0
    _budget: BodyBudget | None = None  # once the head is in: where the body's bytes are counted
    _held = 0  # bytes counted against it
    _body_deadline_set = False  # the channel's deadline is this body's

    def gotLength(self, length: int | None) -> None:
        """The head is in: refuse an ambiguous framing or a declared length over the limit."""
        codings = self.requestHeaders.getRawHeaders(b"transfer-encoding")
        if codings is not None and [c.lower() for c in codings] != [b"chunked"]:
            # Twisted lets "identity" through beside "chunked": a framing two parsers may read two ways.
            self._refuse(AMBIGUOUS_FRAMING, "ambiguous Transfer-Encoding")
            return
        unfit = unfit_request_headers(self.requestHeaders.getAllRawHeaders())
        if unfit:
            self._refuse(CONTROL_IN_HEADER, "a control character in " + unfit[0].decode("ascii", "replace"))
            return
        site = self.channel.site
        if site.on_request is not None:
            site.on_request(self)
        limit = site.max_body_bytes
        if length is not None and length > limit:
            self._refuse(body_too_large(limit), f"body over the {limit}-byte limit")
            return
        if not self._hold(site.body_budget, length or 0):
            return
        super().gotLength(length)
        if length != 0:  # a body follows (None: chunked)
            self.channel.deadline.arm(site.body_timeout, self._body_too_slow)
            self._body_deadline_set = True

    def handleContentChunk(self, data: bytes) -> None:
        """A piece of the body: kept, unless it takes the body over the limit."""
        if self._refused:
            return
        self._received += len(data)
        limit = self.channel.site.max_body_bytes
        if self._received > limit:
            self._drop_body()
            self._refuse(body_too_large(limit), f"body over the {limit}-byte limit")
            return
        if self._received > self._held and not self._hold(self.channel.site.body_budget, len(data)):
            self._drop_body()  # a chunked body, counted as it comes
            return
        super().handleContentChunk(data)

    def _hold(self, budget: BodyBudget, count: int) -> bool:
        """Count ``count`` body bytes against ``budget`` until the request ends; refuse 503 if they do not fit."""
        if not count:
            return True
        if self._budget is None:
            self._budget = budget
            self.notifyFinish().addBoth(self._give_back)  # when it is answered, or the client goes
        if not budget.take(count):
            self._refuse(BODIES_BUSY, f"request bodies held at once would pass {budget.limit} bytes")
            return False
        self._held += count
        return True

    def _give_back(self, _: object) -> None:
        if self._budget is not None:
            self._budget.give_back(self._held)
        self._held = 0

    def _drop_body(self) -> None:
        content = self.content
        assert content is not None  # gotLength made it, before the first piece
        content.close()

    def _body_too_slow(self) -> None:
        self._body_deadline_set = False
        self._refuse(BODY_TIMEOUT, f"no complete body within {self.channel.site.body_timeout:g} s")

    def _stop_body_deadline(self) -> None:
        if self._body_deadline_set:
            self._body_deadline_set = False
            self.channel.deadline.disarm()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The body is complete: its deadline ends."""
        self._stop_body_deadline()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        """The client went away: no deadline runs on (and the body is given back)."""
        self._stop_body_deadline()
        super().connectionLost(reason)

    def _refuse(self, error: ProxyError, why: str) -> None:
        self._refused = True
        self._stop_body_deadline()
        self._give_back(None)  # nothing of the body is kept from now on
        self.content = Sink()
        # No "100 Continue" after the refusal: the channel reads Expect after gotLength.
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport
        assert transport is not None  # the channel is connected: it is reading this request
        response, request_id = early_refusal(self.channel, error)
        log.info("refused a request from {client}: {why} (request_id={request_id})",
                 client=peer_host(transport), why=why, request_id=request_id)
        transport.write(response)
        transport.loseConnection()

    def write(self, data: bytes) -> None:
        """Write to the response: its head and the first piece of its body go out in one write."""
        channel = None if self.startedWriting or not data else getattr(self, "channel", None)
        transport = channel.transport if channel is not None else None
        if not isinstance(transport, TrackedConnection):  # written already, nothing, or no connection
            super().write(data)
            return
        transport.hold()
        try:
            super().write(data)
        finally:
            transport.release()

    def process(self) -> None:
        """Render the request, unless it was refused."""
        if not self._refused:
            super().process()


def _plain_path(target: bytes) -> bool:
    """False for a target whose path has a dot segment or a backslash (``core.check_path``)."""
    try:
        check_path(target)
    except ProxyError:
        return False
    return True


class RootResource(Resource):
    """Dispatch: the proxy's own endpoints by exact path, everything else to the forwarder.

    ``prefixes`` own a whole subtree (``/_admin/...``); ``exact`` answer only their
    own path (``/health``), so ``/health/x`` still goes to a node, and only the
    methods in their ``only_methods`` when they have one. A path with a dot
    segment or a backslash, raw or encoded (``core.check_path``), is never the
    proxy's own: nginx may resolve it to another path than twisted.web does
    (``/_admin/..%2Fstatus``), so it goes to the forwarder, which refuses it
    with 400. With a ``recorder``
    (the end-of-request hook) each request the proxy answers itself is reported
    when it ends.
    """

    def __init__(self, forwarder: Resource, prefixes: dict[bytes, Resource], exact: dict[bytes, Resource],
                 recorder: TrafficRecorder | None = None) -> None:
        super().__init__()
        self._forwarder = forwarder
        self._prefixes = prefixes
        self._exact = exact
        self._recorder = recorder

    def getChildWithDefault(self, name: bytes, request: server.Request) -> Resource:
        """The resource for the first path segment ``name``: one of the proxy's own, or the forwarder."""
        # twisted.web announces its name and version; the proxy does not.
        request.responseHeaders.removeHeader(b"server")
        if not _plain_path(request.uri):
            return self._forwarder  # its route check answers the 400
        own = self._prefixes.get(name)
        if own is None and not request.postpath:
            own = self._exact.get(name)
            if own is not None and request.method not in getattr(own, "only_methods", (request.method,)):
                own = None  # a view of some methods only: the others go to a node
        if own is None:
            return self._forwarder
        if self._recorder is not None:
            tally = self._recorder.begin(request, own_endpoint=True)
            request.notifyFinish().addBoth(self._ended, request, tally)
        return own

    @staticmethod
    def _ended(result: Failure | None, request: server.Request, tally: RequestTally) -> None:
        """A request the proxy answered itself ended (``result`` is a Failure if the client left)."""
        tally.bytes_out = request.sentLength
        if result is None:
            tally.end(request.code, COMPLETE)
        else:
            tally.end(CLIENT_CLOSED_STATUS, CLIENT_GONE)


class ProxyChannel(ChannelWithBadRequestHook):
    """twisted.web's HTTP/1.1 channel with a deadline for each request head and JSON refusals.

    A request head (request line and headers) must be complete within the
    site's ``header_timeout`` seconds of the connection being ready for it
    (opened, or done with the previous request), however slowly its bytes
    trickle in; otherwise the client gets 408 and the connection closes. A
    head Twisted cannot parse gets the JSON 400 instead of a bare status line.
    Either way a log line names the client.
    """

    site: ProxySite  # set by the site, which builds the channel
    #: The connection's one deadline: its next request head's, or (``ProxyRequest``) a body's.
    deadline: LazyDeadline
    _client: str | None = None  # the peer address, once admitted by the site's connection counts
    _secure: bool  # the connection's security and ends: set by connectionMade
    _host: IAddress
    _peer_address: IAddress

    def isSecure(self) -> bool:
        """Whether the connection is TLS (looked up once, at ``connectionMade``)."""
        return self._secure

    def getHost(self) -> IAddress:
        """The local address (one ``getsockname`` per connection, not per request)."""
        return self._host

    def getPeer(self) -> IAddress:
        """The client's address (looked up once, at ``connectionMade``)."""
        return self._peer_address

    def connectionMade(self) -> None:
        """The connection is ready for its first request head: the deadline starts.

        Unless the client's address has ``MAX_CONNECTIONS_PER_CLIENT`` open
        already: then it gets the JSON 429 and the connection closes.
        """
        # A connection's ends and security do not change: asked once, not for every request.
        self._secure, self._host, self._peer_address = super().isSecure(), super().getHost(), super().getPeer()
        super().connectionMade()
        self.deadline = LazyDeadline(cast(DeadlineClock, self.site.reactor))
        client = peer_host(self.transport)
        if not self.site.connections.admit(client):
            log.info("refused a connection from {client}: too many connections open", client=client)
            self.write(early_refusal(self, TOO_MANY_CONNECTIONS)[0])  # the channel's write: straight to its transport
            self.loseConnection()
            self.dataReceived = lambda data: None  # type: ignore[method-assign]  # nothing more is read
            return
        self._client = client
        self._start_head_deadline()

    def allHeadersReceived(self) -> None:
        """The head is complete in time."""
        self._stop_head_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: server.Request) -> None:
        """A request is answered: on a kept-alive connection, the next head's deadline starts."""
        if self.persistent:  # before the channel reads the next head, which may already be here
            self._start_head_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The connection closed: no deadline runs on, and it no longer counts against its address."""
        self.released()
        super().connectionLost(reason)

    def released(self) -> None:
        """The connection is gone (or, taken over by a WebSocket, has gone since): its deadline stops
        and its address's slot is given back. Idempotent."""
        self.deadline.stop()
        if self._client is not None:
            self.site.connections.closed(self._client)
            self._client = None

    def _start_head_deadline(self) -> None:
        self.deadline.arm(self.site.header_timeout, self._head_too_slow)

    def _stop_head_deadline(self) -> None:
        self.deadline.disarm()

    def _head_too_slow(self) -> None:
        response, request_id = early_refusal(self, HEAD_TIMEOUT)
        log.info("closed a connection from {client}: no complete request head within {seconds:g} s "
                 "(request_id={request_id})",
                 client=peer_host(self.transport), seconds=self.site.header_timeout, request_id=request_id)
        self.write(response)  # the channel's write: straight to its transport
        self.timeoutConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A head line longer than Twisted reads (16 KiB) is a malformed request, not a silent close."""
        self.bad_request()

    def bad_request(self) -> None:
        """A head Twisted cannot parse: the JSON 400, a log line naming the client, and close."""
        self._stop_head_deadline()
        response, request_id = early_refusal(self, MALFORMED)
        log.info("refused a malformed request from {client} (request_id={request_id})",
                 client=peer_host(self.transport), request_id=request_id)
        self.write(response)  # the channel's write: straight to its transport
        self.loseConnection()


class ProxySite(server.Site):
    """The ``Site`` for the proxy: our request and channel classes, no form parsing, no
    per-request log line.

    ``on_request``, when set, is called with each request once its head has
    arrived (the graceful stop's ``ConnectionTracker``). The client limits:
    ``max_body_bytes``, ``header_timeout`` and ``body_timeout`` (seconds),
    ``max_buffered_bytes`` (request-body bytes held at once, all requests
    together: ``body_budget``) and ``max_connections_per_client`` (0: no
    limit; peers ``unlimited_peers`` trusts are not limited: ``connections``).
    """

    noisy = False

    def __init__(self, root: Resource, max_body_bytes: int, reactor: IReactorTime | None = None,
                 header_timeout: float = 30.0, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
                 max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                 unlimited_peers: ForwardTrust = NO_PEERS) -> None:
        # Request bodies are forwarded, never parsed as forms (Twisted >= 25.5).
        super().__init__(
            root, requestFactory=ProxyRequest, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.max_body_bytes = max_body_bytes
        self.on_request: Callable[[server.Request], None] | None = None
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.body_budget = BodyBudget(max_buffered_bytes)
        self.connections = ConnectionCounts(max_connections_per_client, unlimited_peers)

    # Twisted types HTTPFactory.protocol as a factory of its private channel wrapper, which is what
    # this returns (``twistedinternals.channel_protocol``), under the public name of what it is.
    def protocol(self) -> IProtocol:  # type: ignore[override]
        """The connection protocol: twisted.web's wrapper around a ``ProxyChannel``."""
        return channel_protocol(ProxyChannel())

    def log(self, request: http.Request) -> None:
        """Access logging is the proxy's own job, not twisted.web's."""
