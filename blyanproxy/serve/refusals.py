"""The proxy's own refusals of a request before it reaches the resource, and the raw responses they send."""

from __future__ import annotations

from twisted.internet.interfaces import ITransport
from twisted.web import http

from blyanproxy.core import DIALECT_PLAIN, REQUEST_ID_HEADER, ProxyError, error_dialect, request_id_for
from blyanproxy.logs import logger
from blyanproxy.twistedinternals import request_line_target

log = logger("server")


def body_too_large(limit: int) -> ProxyError:
    """The 413 for a body over ``limit`` bytes."""
    return ProxyError(413, "body_too_large", f"the request body exceeds {limit} bytes")


MALFORMED = ProxyError(400, "malformed_request", "the request is not valid HTTP/1.1")
AMBIGUOUS_FRAMING = ProxyError(400, "malformed_request", "Transfer-Encoding must be chunked, once")
HEAD_TIMEOUT = ProxyError(408, "request_timeout", "the request head did not arrive in time")
CONTROL_IN_HEADER = ProxyError(400, "malformed_request", "a header value holds a control character")
BODY_TIMEOUT = ProxyError(408, "request_timeout", "the request body did not arrive in time")
BODIES_BUSY = ProxyError(503, "proxy_busy", "too many request bodies are held at once; try again", retry_after=1)
TOO_MANY_CONNECTIONS = ProxyError(429, "too_many_connections", "this address has too many connections open")


def peer_host(transport: ITransport | None) -> str:
    """The client's address as text, for log lines (``unknown`` when there is none)."""
    return getattr(transport.getPeer(), "host", "unknown") if transport is not None else "unknown"


def early_refusal(channel: http.HTTPChannel, error: ProxyError) -> tuple[bytes, str]:
    """``(raw response, request id)`` refusing the request whose head ``channel`` is reading.

    Once its request line has arrived, the body takes the shape of the path it
    names (``error_dialect``) and the id is the client's ``X-Request-Id``
    among the headers read so far, when usable; else the plain shape and a new id.
    """
    target = request_line_target(channel)
    sent: list[bytes] = []
    if target is not None and channel.requests:
        sent = list(channel.requests[-1].requestHeaders.getRawHeaders(REQUEST_ID_HEADER, []))
    request_id = request_id_for(sent)
    if request_id.replaced is not None:
        log.info("replaced the X-Request-Id of a refused request by {request_id}: {why}",
                 request_id=request_id.value, why=request_id.replaced)
    dialect = error_dialect(target) if target is not None else DIALECT_PLAIN
    return error.raw_response(dialect, request_id.value), request_id.value


class Sink:
    """A file-like object that forgets what is written (the body of a refused request).

    Twisted may still complete a refused request (a body-less one, such as
    ``Transfer-Encoding: identity`` with nothing after the head), which asks
    its content for ``tell``, ``seek`` and ``read``.
    """

    def write(self, data: bytes) -> None:
        """Drop ``data``."""

    def tell(self) -> int:
        """Always at the start."""
        return 0

    def seek(self, *args: int) -> int:
        """Stay at the start."""
        return 0

    def read(self, *args: int) -> bytes:
        """Nothing was kept."""
        return b""

    def close(self) -> None:
        """Nothing to close."""
