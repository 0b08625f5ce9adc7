"""Errors as values, and the JSON shapes an error answer takes: the proxy's own, OpenAI's and Ollama's.

Which shape a client gets depends on the API it called (``core.dialects``):

- ``plain`` (the proxy's own shape): ``{"error": "<message>", "code": "<word>"}``;
- ``openai``: ``{"error": {"message", "type", "param", "code"}}``, what the
  openai SDKs read (they pick the exception class from the status, then read
  ``error.message``, ``code``, ``param`` and ``type``);
- ``ollama``: ``{"error": "<message>"}``, what the ollama clients read.

The plain and OpenAI shapes also carry the request's id as a top-level
``request_id`` when it has one (clients ignore keys they do not know); the
Ollama shape stays as Ollama sends it, and the id travels in ``X-Request-Id``.
"""

from __future__ import annotations

import json
from typing import Literal

import attrs

#: The error shapes (see the module docstring).
Dialect = Literal["plain", "openai", "ollama"]
DIALECT_PLAIN: Dialect = "plain"
DIALECT_OPENAI: Dialect = "openai"
DIALECT_OLLAMA: Dialect = "ollama"

#: The header an answer's request id travels in, both ways.
REQUEST_ID_HEADER = b"X-Request-Id"

#: The reason phrase of each status the proxy answers itself.
REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def openai_error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an answer's status.

    As OpenAI's API answers: ``authentication_error`` (401),
    ``permission_error`` (403), ``rate_limit_error`` (429), ``server_error``
    (5xx) and ``invalid_request_error`` for every other status, 404 included
    (OpenAI's "model not found" is one).
    """
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@attrs.frozen
class ProxyError(Exception):
    """A failure to answer a request, with the status and JSON body it becomes.

    ``code`` is a stable machine-readable word (``no_healthy_nodes``,
    ``upstream_timeout`` …); ``message`` is for people; ``retry_after`` (seconds)
    becomes a ``Retry-After`` header; ``param``, when set, names the request
    parameter at fault (OpenAI's ``error.param``).
    """

    status: int
    code: str
    message: str
    retry_after: int | None = None
    param: str | None = None

    def document(self, dialect: Dialect = DIALECT_PLAIN, request_id: str | None = None) -> dict[str, object]:
        """The JSON document of the error in ``dialect``'s shape (see the module docstring)."""
        if dialect == DIALECT_OLLAMA:
            return {"error": self.message}
        document: dict[str, object]
        if dialect == DIALECT_OPENAI:
            document = {"error": {"message": self.message, "type": openai_error_type(self.status),
                                  "param": self.param, "code": self.code}}
        else:
            document = {"error": self.message, "code": self.code}
        if request_id is not None:
            document["request_id"] = request_id
        return document

    def body(self, dialect: Dialect = DIALECT_PLAIN, request_id: str | None = None) -> bytes:
        """The JSON body: ``document`` encoded."""
        return json.dumps(self.document(dialect, request_id)).encode("utf-8")

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers as ``(name, value)`` byte pairs, without framing."""
        pairs = [(b"Content-Type", b"application/json")]
        if self.retry_after is not None:
            pairs.append((b"Retry-After", b"%d" % self.retry_after))
        return pairs

    def raw_response(self, dialect: Dialect = DIALECT_PLAIN, request_id: str | None = None) -> bytes:
        """A complete HTTP/1.1 response that closes the connection, for use before parsing ends."""
        body = self.body(dialect, request_id)
        lines = [b"HTTP/1.1 %d %s" % (self.status, REASONS.get(self.status, b"Error"))]
        lines += [name + b": " + value for name, value in self.headers()]
        if request_id is not None:
            lines.append(REQUEST_ID_HEADER + b": " + request_id.encode("ascii"))
        lines += [b"Content-Length: %d" % len(body), b"Connection: close", b"", body]
        return b"\r\n".join(lines)
