"""Pure HTTP/1.1 message handling for the upstream side: heads, framing, chunked bodies.

No I/O here: the connection in ``client`` feeds bytes in and acts on the answers.
"""

from __future__ import annotations

import re

from blyanproxy.core import RawHeaders

MAX_HEAD = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_STATUS = re.compile(rb"[1-5][0-9][0-9]\Z")
#: Control characters other than horizontal tab: never allowed in a header value or reason.
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class ProtocolError(Exception):
    """The node's answer cannot be parsed as HTTP/1.1."""


def _serialize_head(first_line: bytes, headers: RawHeaders) -> bytes:
    lines = [first_line]
    for name, values in headers:
        for value in values:
            lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def serialize_request_head(method: bytes, target: bytes, headers: RawHeaders) -> bytes:
    """The raw bytes of an HTTP/1.1 request head (values must already be free of CR and LF)."""
    return _serialize_head(method + b" " + target + b" HTTP/1.1", headers)


def serialize_response_head(status: int, reason: bytes, headers: RawHeaders) -> bytes:
    """The raw bytes of an HTTP/1.1 response head (values must already be free of CR and LF)."""
    return _serialize_head(b"HTTP/1.1 %d %s" % (status, reason), headers)


def parse_head(head: bytes) -> tuple[int, bytes, RawHeaders]:
    """``(status, reason, headers)`` of a response head (without the final blank line).

    Repeated header names are grouped, keeping the first spelling; obsolete
    line folding and malformed lines raise ``ProtocolError``.
    """
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if (
        len(status_line) < 2
        or status_line[0] not in (b"HTTP/1.0", b"HTTP/1.1")
        or not _STATUS.match(status_line[1])
        or _FORBIDDEN_IN_VALUE.search(lines[0])
    ):
        raise ProtocolError("malformed status line")
    grouped: dict[bytes, tuple[bytes, list[bytes]]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name) or _FORBIDDEN_IN_VALUE.search(value):
            raise ProtocolError("malformed header line")
        key = name.lower()
        entry = grouped.get(key)
        if entry is None:
            grouped[key] = (name, [value.strip()])
        else:
            entry[1].append(value.strip())
    reason = status_line[2] if len(status_line) > 2 else b""
    return int(status_line[1]), reason, list(grouped.values())


def _tokens(headers: RawHeaders, wanted: bytes) -> list[bytes]:
    for name, values in headers:
        if name.lower() == wanted:
            return [t.strip().lower() for v in values for t in v.split(b",") if t.strip()]
    return []


def body_framing(method: bytes, status: int, version: bytes, headers: RawHeaders) -> tuple[str, int | None]:
    """How the body of a response is delimited: ``("none" | "length" | "chunked" | "close", length)``."""
    if method == b"HEAD" or status < 200 or status in _NO_BODY_STATUSES:
        return "none", 0
    codings = _tokens(headers, b"transfer-encoding")
    if codings:
        return ("chunked", None) if codings[-1] == b"chunked" else ("close", None)
    lengths = {v.strip() for name, values in headers if name.lower() == b"content-length" for v in values}
    if lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise ProtocolError("bad Content-Length")
        return "length", int(next(iter(lengths)))
    return "close", None


def keeps_alive(version: bytes, headers: RawHeaders) -> bool:
    """Whether the connection may carry another request after this response."""
    tokens = _tokens(headers, b"connection")
    if version == b"HTTP/1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")
_MAX_CHUNK_LINE = 4096


class ChunkedBody:
    """Follows the framing of a chunked body as its bytes arrive.

    ``feed(data, pieces)`` returns the index in ``data`` just past the end of
    the body, or -1 while it goes on, and appends the chunk data to
    ``pieces`` (decoding). With ``framed`` it appends the body re-framed
    instead, to be passed on chunk for chunk: each size line as its bare hex
    digits (a node's chunk extensions are dropped) and the last chunk without
    trailers, so nothing a node puts there reaches a client unchecked.
    Malformed framing raises ``ProtocolError``.
    """

    def __init__(self) -> None:
        self._line = b""  # a size or trailer line split across reads
        self._remaining = 0  # data bytes left in the current chunk
        self._state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailer lines
        self._crlf_seen = 0

    @property
    def at_boundary(self) -> bool:
        """True between chunks, where a whole new chunk may be inserted."""
        return self._state == 0 and not self._line

    def feed(self, data: bytes, pieces: list[bytes], framed: bool = False) -> int:
        """Take the next bytes of the body (see the class docstring)."""
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == 0 and framed and not self._line:
                # The usual case when passing chunks on: a whole chunk with a bare size line is
                # already what would be passed on, byte for byte.
                newline = data.find(b"\r\n", i, i + 17)
                if newline != -1 and _HEX_SIZE.match(data, i, newline):
                    end = newline + 2 + int(data[i:newline], 16)
                    if end > newline + 2 and data[end:end + 2] == b"\r\n":
                        pieces.append(data[i:end + 2])
                        i = end + 2
                        continue
            if state == 2 and not self._crlf_seen and data[i:i + 2] == b"\r\n":
                i += 2  # the usual case: the whole CRLF after a chunk's data
                self._chunk_done(pieces, framed)
                continue
            if state == 1:
                take = min(self._remaining, n - i)
                pieces.append(data[i:i + take])
                i += take
                self._remaining -= take
                if not self._remaining:
                    self._state, self._crlf_seen = 2, 0
            elif state == 2:
                if data[i] != b"\r\n"[self._crlf_seen]:
                    raise ProtocolError("chunk data not followed by CRLF")
                i += 1
                self._crlf_seen += 1
                if self._crlf_seen == 2:
                    self._chunk_done(pieces, framed)
            else:
                newline = data.find(b"\n", i)
                if newline == -1:
                    self._line += data[i:]
                    if len(self._line) > _MAX_CHUNK_LINE:
                        raise ProtocolError("chunk line too long")
                    return -1
                line = self._line + data[i:newline + 1]
                self._line = b""
                i = newline + 1
                if line[-2:] != b"\r\n" or len(line) > _MAX_CHUNK_LINE:
                    raise ProtocolError("malformed chunk line")
                if state == 3:
                    if len(line) == 2:
                        if framed:
                            pieces.append(b"\r\n")
                        return i  # the blank line after the last chunk and its trailers
                    continue  # a trailer: never passed on
                size = line[:-2].split(b";", 1)[0].strip()
                if not _HEX_SIZE.match(size):
                    raise ProtocolError("malformed chunk size")
                if framed:
                    pieces.append(size + b"\r\n")
                self._remaining = int(size, 16)
                self._state = 1 if self._remaining else 3
        return -1

    def _chunk_done(self, pieces: list[bytes], framed: bool) -> None:
        self._state = 0
        if framed:
            pieces.append(b"\r\n")
