"""Which error shape a client parses, decided by the path it called, and the answer written in it.

A path is read as ``core.routing`` reads it: the ``/tags/{tag}`` or
``/{n}`` prefix that chooses nodes is skipped, then

- ``/v1/…`` (and ``/api/v1/…``, which reaches the node as ``/v1/…``) is
  OpenAI's API: the ``openai`` shape;
- ``/api/<endpoint>/…`` for an endpoint of Ollama's native API
  (``generate``, ``chat``, ``embed``, ``embeddings``, ``tags``, ``show``,
  ``ps``, …) is Ollama's: the ``ollama`` shape;
- anything else, and a target that is no path, gets the proxy's own
  ``plain`` shape. The admin API is not forwarded and keeps its one shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from blyanproxy.core.errors import (
    DIALECT_OLLAMA,
    DIALECT_OPENAI,
    DIALECT_PLAIN,
    REASONS,
    REQUEST_ID_HEADER,
    Dialect,
    ProxyError,
)
from blyanproxy.core.routing import _split_first_segment, request_target_path

#: The endpoints of Ollama's native API, under ``/api``.
OLLAMA_ENDPOINTS = frozenset({
    b"generate", b"chat", b"embed", b"embeddings", b"tags", b"show", b"ps", b"pull", b"push", b"create",
    b"copy", b"delete", b"blobs", b"version",
})


def _is_index(segment: bytes) -> bool:
    """Whether a first segment is a node index (signed ones too: they are refused, as index paths)."""
    return segment.isdigit() or (segment[:1] in (b"-", b"+") and segment[1:].isdigit())


def error_dialect(target: bytes) -> Dialect:
    """The error shape a client calling ``target`` (a raw request target) parses (module docstring)."""
    try:
        origin = request_target_path(target)
    except ProxyError:
        return DIALECT_PLAIN
    first, rest = _split_first_segment(origin)
    if first == b"tags":
        rest = _split_first_segment(rest)[1]
    elif not _is_index(first):
        rest = origin
    first, rest = _split_first_segment(rest)
    if first == b"v1":
        return DIALECT_OPENAI
    if first == b"api":
        second = _split_first_segment(rest)[0]
        if second == b"v1":
            return DIALECT_OPENAI
        if second in OLLAMA_ENDPOINTS:
            return DIALECT_OLLAMA
    return DIALECT_PLAIN


class HeaderTable(Protocol):
    """The header operations ``write_error`` uses on twisted.web's ``Headers``."""

    def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:
        """Replace every value of ``name``."""

    def getRawHeaders(self, name: bytes) -> Sequence[bytes] | None:
        """Every value of ``name``, or None."""


class Answerable(Protocol):
    """What ``write_error`` needs of a twisted.web request."""

    @property
    def uri(self) -> bytes:
        """The request target as sent."""

    @property
    def responseHeaders(self) -> HeaderTable:
        """The headers of the answer."""

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """Set the status."""

    def write(self, data: bytes) -> None:
        """Send body bytes."""

    def finish(self) -> object:
        """End the answer."""


def answer_request_id(request: Answerable) -> str | None:
    """The ``X-Request-Id`` an answer carries (the end-of-request hook sets it), or None."""
    ids = request.responseHeaders.getRawHeaders(REQUEST_ID_HEADER)
    return ids[0].decode("ascii") if ids else None


def write_error(request: Answerable, error: ProxyError) -> None:
    """Answer a twisted.web request with ``error`` and finish it (headers replace any set).

    The body takes the shape the request's path calls for (``error_dialect``)
    and names the answer's request id (``answer_request_id``).
    """
    request.setResponseCode(error.status, REASONS.get(error.status))
    for name, value in error.headers():
        request.responseHeaders.setRawHeaders(name, [value])
    body = error.body(error_dialect(request.uri), answer_request_id(request))
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()
