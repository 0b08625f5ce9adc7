"""Errors as values, and the one JSON shape every error response has."""

from __future__ import annotations

import json
from typing import Protocol

import attrs

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@attrs.frozen
class ProxyError(Exception):
    """A failure to answer a request, with the status and JSON body it becomes.

    ``code`` is a stable machine-readable word (``no_healthy_nodes``,
    ``upstream_timeout`` …); ``message`` is for people; ``retry_after`` (seconds)
    becomes a ``Retry-After`` header.
    """

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def body(self) -> bytes:
        """The JSON body: ``{"error": message, "code": code}``."""
        return json.dumps({"error": self.message, "code": self.code}).encode("utf-8")

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers as ``(name, value)`` byte pairs, without framing."""
        pairs = [(b"Content-Type", b"application/json")]
        if self.retry_after is not None:
            pairs.append((b"Retry-After", b"%d" % self.retry_after))
        return pairs

    def raw_response(self) -> bytes:
        """A complete HTTP/1.1 response that closes the connection, for use before parsing ends."""
        body = self.body()
        lines = [b"HTTP/1.1 %d %s" % (self.status, _REASONS.get(self.status, b"Error"))]
        lines += [name + b": " + value for name, value in self.headers()]
        lines += [b"Content-Length: %d" % len(body), b"Connection: close", b"", body]
        return b"\r\n".join(lines)


class HeaderTable(Protocol):
    """The header operations the proxy uses on twisted.web's ``Headers``."""

    def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:
        """Replace every value of ``name``."""


class Answerable(Protocol):
    """What ``write_error`` needs of a twisted.web request."""

    @property
    def responseHeaders(self) -> HeaderTable:
        """The headers of the answer."""

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """Set the status."""

    def write(self, data: bytes) -> None:
        """Send body bytes."""

    def finish(self) -> object:
        """End the answer."""


def write_error(request: Answerable, error: ProxyError) -> None:
    """Answer a twisted.web request with ``error`` and finish it (headers replace any set)."""
    request.setResponseCode(error.status, _REASONS.get(error.status))
    for name, value in error.headers():
        request.responseHeaders.setRawHeaders(name, [value])
    body = error.body()
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()
