"""The listening side: the request class, the root resource and the ``Site``."""

from __future__ import annotations

from typing import Callable

from twisted.web import server
from twisted.web.resource import Resource

from blyanproxy.core import ProxyError
from blyanproxy.forward import CLIENT_CLOSED_STATUS, CLIENT_GONE, COMPLETE, RequestTally, TrafficRecorder
from blyanproxy.logs import logger
from blyanproxy.twistedinternals import ChannelWithBadRequestHook, channel_protocol

log = logger("server")


def body_too_large(limit: int) -> ProxyError:
    """The 413 for a body over ``limit`` bytes."""
    return ProxyError(413, "body_too_large", f"the request body exceeds {limit} bytes")


MALFORMED = ProxyError(400, "malformed_request", "the request is not valid HTTP/1.1")
AMBIGUOUS_FRAMING = ProxyError(400, "malformed_request", "Transfer-Encoding must be chunked, once")
HEAD_TIMEOUT = ProxyError(408, "request_timeout", "the request head did not arrive in time")


def _peer(transport) -> str:
    return getattr(transport.getPeer(), "host", "unknown") if transport is not None else "unknown"


class _Sink:
    """A file-like object that forgets what is written (the body of a refused request)."""

    def write(self, data: bytes) -> None:
        """Drop ``data``."""

    def seek(self, *args) -> int:
        return 0

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        """Nothing to close."""


class ProxyRequest(server.Request):
    """A request that refuses an oversized body as soon as its size is known.

    A declared ``Content-Length`` over the site's ``max_body_bytes`` is answered
    413 before the body is read; a chunked body is refused the moment it
    passes the limit. Either way the connection closes and nothing is kept.
    """

    _refused = False
    _received = 0

    def gotLength(self, length) -> None:
        codings = self.requestHeaders.getRawHeaders(b"transfer-encoding")
        if codings is not None and [c.lower() for c in codings] != [b"chunked"]:
            # Twisted lets "identity" through beside "chunked": a framing two parsers may read two ways.
            self._refuse(AMBIGUOUS_FRAMING, "ambiguous Transfer-Encoding")
            return
        if self.channel.site.on_request is not None:
            self.channel.site.on_request(self)
        limit = self.channel.site.max_body_bytes
        if length is not None and length > limit:
            self._refuse(body_too_large(limit), f"body over the {limit}-byte limit")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        limit = self.channel.site.max_body_bytes
        if self._received > limit:
            self.content.close()
            self._refuse(body_too_large(limit), f"body over the {limit}-byte limit")
            return
        super().handleContentChunk(data)

    def _refuse(self, error: ProxyError, why: str) -> None:
        self._refused = True
        self.content = _Sink()
        # No "100 Continue" after the refusal: the channel reads Expect after gotLength.
        self.requestHeaders.removeHeader(b"expect")
        log.info("refused a request from {client}: {why}", client=_peer(self.channel.transport), why=why)
        self.channel.transport.write(error.raw_response())
        self.channel.transport.loseConnection()

    def process(self) -> None:
        if not self._refused:
            super().process()


class RootResource(Resource):
    """Dispatch: the proxy's own endpoints by exact path, everything else to the forwarder.

    ``prefixes`` own a whole subtree (``/_admin/...``); ``exact`` answer only their
    own path (``/health``), so ``/health/x`` still goes to a node, and only the
    methods in their ``only_methods`` when they have one. With a ``recorder``
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

    def getChildWithDefault(self, name: bytes, request):
        # twisted.web announces its name and version; the proxy does not.
        request.responseHeaders.removeHeader(b"server")
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
    def _ended(result, request, tally: RequestTally) -> None:
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

    _head_deadline = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_head_deadline()

    def allHeadersReceived(self) -> None:
        self._stop_head_deadline()
        super().allHeadersReceived()

    def requestDone(self, request) -> None:
        if self.persistent:  # before the channel reads the next head, which may already be here
            self._start_head_deadline()
        super().requestDone(request)

    def connectionLost(self, reason) -> None:
        self._stop_head_deadline()
        super().connectionLost(reason)

    def _start_head_deadline(self) -> None:
        self._stop_head_deadline()
        self._head_deadline = self.callLater(self.site.header_timeout, self._head_too_slow)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        log.info("closed a connection from {client}: no complete request head within {seconds:g} s",
                 client=_peer(self.transport), seconds=self.site.header_timeout)
        self.transport.write(HEAD_TIMEOUT.raw_response())
        self.timeoutConnection()

    def lineLengthExceeded(self, line) -> None:
        """A head line longer than Twisted reads (16 KiB) is a malformed request, not a silent close."""
        self.bad_request()

    def bad_request(self) -> None:
        """A head Twisted cannot parse: the JSON 400, a log line naming the client, and close."""
        self._stop_head_deadline()
        log.info("refused a malformed request from {client}", client=_peer(self.transport))
        self.transport.write(MALFORMED.raw_response())
        self.loseConnection()


class ProxySite(server.Site):
    """The ``Site`` for the proxy: our request and channel classes, no form parsing, no
    per-request log line.

    ``on_request``, when set, is called with each request once its head has
    arrived (the graceful stop's ``ConnectionTracker``).
    """

    noisy = False

    def __init__(self, root: Resource, max_body_bytes: int, reactor=None, header_timeout: float = 30.0) -> None:
        # Request bodies are forwarded, never parsed as forms (Twisted >= 25.5).
        super().__init__(
            root, requestFactory=ProxyRequest, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.max_body_bytes = max_body_bytes
        self.on_request: Callable[[server.Request], None] | None = None
        self.header_timeout = header_timeout

    def protocol(self):
        """The connection protocol: twisted.web's wrapper around a ``ProxyChannel``."""
        return channel_protocol(ProxyChannel())

    def log(self, request) -> None:
        """Access logging is the proxy's own job, not twisted.web's."""
