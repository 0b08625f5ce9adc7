"""The listening side: the request class, the root resource and the ``Site``."""

from __future__ import annotations

from typing import Callable, Dict, Optional

from twisted.web import server
from twisted.web.resource import Resource

from .errors import ProxyError
from .headers import client_facts
from .logs import logger
from .traffic import CLIENT_CLOSED_STATUS, CLIENT_GONE, COMPLETE, AccessRecord

log = logger("server")


def body_too_large(limit: int) -> ProxyError:
    """The 413 for a body over ``limit`` bytes."""
    return ProxyError(413, "body_too_large", f"the request body exceeds {limit} bytes")


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
        if self.channel.site.on_request is not None:
            self.channel.site.on_request(self)
        limit = self.channel.site.max_body_bytes
        if length is not None and length > limit:
            self._refuse(limit)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        limit = self.channel.site.max_body_bytes
        if self._received > limit:
            self.content.close()
            self._refuse(limit)
            return
        super().handleContentChunk(data)

    def _refuse(self, limit: int) -> None:
        self._refused = True
        self.content = _Sink()
        # No "100 Continue" after the refusal: the channel reads Expect after gotLength.
        self.requestHeaders.removeHeader(b"expect")
        log.info(
            "refused a request from {client}: body over the {limit}-byte limit",
            client=getattr(self.getClientAddress(), "host", "unknown"), limit=limit,
        )
        self.channel.transport.write(body_too_large(limit).raw_response())
        self.channel.transport.loseConnection()

    def process(self) -> None:
        if not self._refused:
            super().process()


class RootResource(Resource):
    """Dispatch: the proxy's own endpoints by exact path, everything else to the forwarder.

    ``prefixes`` own a whole subtree (``/_admin/...``); ``exact`` answer only their
    own path (``/health``), so ``/health/x`` still goes to a node, and only the
    methods in their ``only_methods`` when they have one. ``trust``
    (``TRUST_FORWARDED``) decides which client address their access lines show.
    """

    def __init__(self, forwarder: Resource, prefixes: Dict[bytes, Resource], exact: Dict[bytes, Resource],
                 recorder=None, clock=None, trust=False):
        super().__init__()
        self._trust = trust
        self._forwarder = forwarder
        self._prefixes = prefixes
        self._exact = exact
        self._recorder = recorder
        self._clock = clock

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
            request.notifyFinish().addBoth(self._record, request, self._clock.seconds())
        return own

    def _record(self, result, request, started: float) -> None:
        """The access line of a request the proxy answered itself."""
        self._recorder.finished(AccessRecord(
            method=request.method.decode("latin-1"),
            target=request.uri,
            status=request.code if result is None else CLIENT_CLOSED_STATUS,
            node=None,
            attempts=0,
            ttfb=None,
            duration=self._clock.seconds() - started,
            bytes_out=request.sentLength,
            ended=COMPLETE if result is None else CLIENT_GONE,
            client=client_facts(request, self._trust).origin,
        ))


class ProxySite(server.Site):
    """The ``Site`` for the proxy: our request class, no form parsing, no per-request log line.

    ``on_request``, when set, is called with each request once its head has
    arrived (the graceful stop's ``ConnectionTracker``).
    """

    noisy = False

    def __init__(self, root: Resource, max_body_bytes: int, reactor=None) -> None:
        # Request bodies are forwarded, never parsed as forms (Twisted >= 25.5).
        super().__init__(
            root, requestFactory=ProxyRequest, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.max_body_bytes = max_body_bytes
        self.on_request: Optional[Callable[[server.Request], None]] = None

    def log(self, request) -> None:
        """Access logging is the proxy's own job, not twisted.web's."""
