"""The WebSocket opening handshake (RFC 6455 §4): when a node's ``101`` really completes it.

A node's ``101 Switching Protocols`` turns the client's connection into a raw
tunnel to that node, past every HTTP rule of the proxy and of an nginx in
front. So the proxy splices only on a ``101`` that upgrades to ``websocket``
and proves, with ``Sec-WebSocket-Accept``, that the node read this client's
``Sec-WebSocket-Key``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence

#: RFC 6455 §1.3: appended to the client's key before hashing.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value that answers ``key``: base64(sha1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key.strip() + WEBSOCKET_GUID).digest())


def _values(headers: Iterable[tuple[bytes, Sequence[bytes]]], wanted: bytes) -> list[bytes]:
    return [value for name, values in headers if name.lower() == wanted for value in values]


def _tokens(headers: Iterable[tuple[bytes, Sequence[bytes]]], wanted: bytes) -> list[bytes]:
    return [t.strip().lower() for value in _values(headers, wanted) for t in value.split(b",") if t.strip()]


def handshake_problem(client_keys: Sequence[bytes], answer: Sequence[tuple[bytes, Sequence[bytes]]]) -> str | None:
    """Why the headers of a node's ``101`` do not complete the handshake for ``client_keys`` (the
    client's ``Sec-WebSocket-Key`` values), or None when they do.

    They must say ``Upgrade: websocket`` (that one protocol), list ``upgrade``
    in ``Connection``, and carry exactly one ``Sec-WebSocket-Accept`` that
    answers the client's one key.
    """
    if len(client_keys) != 1 or not client_keys[0].strip():
        return "the client sent no single Sec-WebSocket-Key"
    if _tokens(answer, b"upgrade") != [b"websocket"]:
        return "it does not upgrade to websocket"
    if b"upgrade" not in _tokens(answer, b"connection"):
        return "its Connection header does not say upgrade"
    if _values(answer, b"sec-websocket-accept") != [websocket_accept(client_keys[0])]:
        return "its Sec-WebSocket-Accept does not answer the client's key"
    return None
