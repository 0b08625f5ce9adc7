"""Request ids: the client's ``X-Request-Id`` when it is usable, else a fresh one; and the headers a node gets.

An id is 1 to 128 printable ASCII characters without spaces
(``!`` to ``~``), so it is safe in a header, a log line and a JSON string. A
client's id that is not (or that comes more than once) is replaced by a new
one: 32 hex characters, as random as a uuid4.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import attrs

from blyanproxy.core.headers import RawHeaders

#: The longest request id accepted from a client.
MAX_REQUEST_ID_LENGTH = 128


class _RandomHex:
    """Random hex text from the system's randomness, read a few kilobytes at a time (one
    ``getrandom`` per 256 ids, not one per id)."""

    def __init__(self, read: Callable[[int], bytes] = os.urandom, chunk: int = 4096) -> None:
        self._read = read
        self._chunk = chunk
        self._text = ""
        self._at = 0

    def take(self, count: int) -> str:
        """``count`` fresh hex characters (``count`` at most twice the chunk)."""
        if self._at + count > len(self._text):
            self._text, self._at = self._read(self._chunk).hex(), 0
        start = self._at
        self._at += count
        return self._text[start:self._at]


_RANDOM_HEX = _RandomHex()


def new_request_id() -> str:
    """A fresh request id: 32 random hex characters."""
    return _RANDOM_HEX.take(32)


@attrs.frozen
class RequestId:
    """A request's id, and why the client's ``X-Request-Id`` was replaced (None: it was used, or none came)."""

    value: str
    replaced: str | None = None


def request_id_problem(value: bytes) -> str | None:
    """Why ``value`` cannot be a request id, or None when it can."""
    if not value:
        return "it is empty"
    if len(value) > MAX_REQUEST_ID_LENGTH:
        return f"it is longer than {MAX_REQUEST_ID_LENGTH} characters"
    if any(byte < 0x21 or byte > 0x7E for byte in value):
        return "it is not printable ASCII without spaces"
    return None


def request_id_for(sent: Sequence[bytes], make: Callable[[], str] = new_request_id) -> RequestId:
    """The id of a request whose ``X-Request-Id`` values are ``sent``: the client's one, or ``make()``."""
    if not sent:
        return RequestId(make())
    if len(sent) > 1:
        return RequestId(make(), "it came more than once")
    problem = request_id_problem(sent[0])
    if problem is not None:
        return RequestId(make(), problem)
    return RequestId(sent[0].decode("ascii"))


def replace_headers(headers: RawHeaders, replacements: Sequence[tuple[bytes, bytes]]) -> RawHeaders:
    """``headers`` with each header named in ``replacements`` (any case) set to its one value there."""
    names = {name.lower() for name, _ in replacements}
    kept = [(name, values) for name, values in headers if name.lower() not in names]
    return kept + [(name, [value]) for name, value in replacements]
