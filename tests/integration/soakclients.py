"""The soak's clients: raw HTTP/1.1 exchanges on 127.0.0.1 and how each one ended.

Every exchange has its own connection (``Connection: close``) and a timeout;
``classify`` reads what arrived and says how the exchange ended:

- ``ok``: a complete answer (framing complete; for an SSE stream the
  devnode's final event, with its ``finish_reason``, and ``data: [DONE]``);
- ``error``: the proxy said it failed (a 4xx/5xx JSON error, or an SSE
  ``event: error``);
- ``cut``: the connection closed before the answer's framing was complete
  (an honest end of a broken stream, as the README promises);
- ``timeout``: nothing ended it before the client's timeout (the client hung up);
- ``false_success``: the framing ended cleanly with status 200 but the
  answer is not whole — the one outcome that must never happen.
"""

from __future__ import annotations

import json
import re

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

OK, ERROR, CUT, TIMEOUT, FALSE_SUCCESS, VANISHED = "ok", "error", "cut", "timeout", "false_success", "vanished"
_FINAL_EVENT = re.compile(rb'"finish_reason":\s*"(stop|length)"')


@attrs.frozen
class Answer:
    """What arrived for one exchange, parsed: the status (0: no head), the headers, the decoded
    body, and whether the body's framing was complete."""

    status: int
    headers: dict
    body: bytes
    complete: bool


def parse_answer(received: bytes) -> Answer:
    """Parse a raw HTTP/1.1 response as far as it arrived."""
    head, separator, rest = received.partition(b"\r\n\r\n")
    if not separator:
        return Answer(0, {}, b"", False)
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ")[1])
    except (IndexError, ValueError):
        return Answer(0, {}, b"", False)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body, complete = _dechunk(rest)
        return Answer(status, headers, body, complete)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        return Answer(status, headers, rest[:length], len(rest) >= length)
    return Answer(status, headers, rest, False)  # ended by the close: no way to tell it whole


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = b""
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        if not separator:
            return body, False
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return body, False
        if size == 0:
            return body, data.startswith(b"\r\n") or b"\r\n\r\n" in data
        if len(data) < size + 2:
            return body + data[:size], False
        body, data = body + data[:size], data[size + 2:]


def classify(received: bytes, timed_out: bool, stream: bool) -> str:
    """How one exchange ended (see the module docstring)."""
    answer = parse_answer(received)
    if b"event: error" in answer.body or (answer.status >= 400 and answer.complete):
        return ERROR
    if answer.complete:
        if answer.status != 200:
            return FALSE_SUCCESS
        if stream:
            whole = _FINAL_EVENT.search(answer.body) is not None and b"data: [DONE]" in answer.body
            return OK if whole else FALSE_SUCCESS
        return OK if _is_json(answer.body) or answer.headers.get(b"content-type", b"").startswith(
            b"application/octet-stream") else FALSE_SUCCESS
    return TIMEOUT if timed_out else CUT


def error_code(received: bytes) -> str:
    """The ``code`` of the proxy's error (the SSE error event's, or the JSON body's), else the status."""
    answer = parse_answer(received)
    _, marker, rest = answer.body.partition(b"event: error\ndata: ")
    document = rest.split(b"\n", 1)[0] if marker else answer.body
    try:
        return str(json.loads(document)["code"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {answer.status}"


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


class Exchange(Protocol):
    """One request on its own connection, with optional misbehaviour.

    ``pieces`` are written one after another, ``gap`` seconds apart (a slow
    sender); ``read_pause`` pauses reading that long after every ``read_run``
    seconds of reading (a slow reader); ``vanish_after`` aborts the connection
    that many seconds after it opened (a client that goes away).
    """

    def __init__(self, reactor, pieces: list[bytes], gap: float = 0.0, read_pause: float = 0.0,
                 read_run: float = 0.1, vanish_after: float | None = None) -> None:
        self._reactor = reactor
        self._pieces = list(pieces)
        self._gap = gap
        self._read_pause = read_pause
        self._read_run = read_run
        self._vanish_after = vanish_after
        self.received = b""
        self.vanished = False
        self.closed: defer.Deferred = defer.Deferred()
        self._calls: list = []

    def connectionMade(self) -> None:
        self._write_next()
        if self._read_pause:
            self._later(self._read_run, self._pause)
        if self._vanish_after is not None:
            self._later(self._vanish_after, self.vanish)

    def _later(self, delay, action) -> None:
        self._calls.append(self._reactor.callLater(delay, action))

    def _write_next(self) -> None:
        if self._pieces and self.transport is not None:
            self.transport.write(self._pieces.pop(0))
            if self._pieces:
                self._later(self._gap, self._write_next)

    def _pause(self) -> None:
        self.transport.pauseProducing()
        self._later(self._read_pause, self._resume)

    def _resume(self) -> None:
        self.transport.resumeProducing()
        self._later(self._read_run, self._pause)

    def vanish(self) -> None:
        """Hang up at once, as a client that went away."""
        self.vanished = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self.closed.callback(None)


@attrs.frozen
class Ended:
    """How one exchange ended, and for an error the proxy's code for it."""

    outcome: str
    code: str | None = None


async def exchange(reactor, port: int, pieces: list[bytes], timeout: float, stream: bool,
                   **misbehaviour) -> Ended:
    """Run one exchange against ``127.0.0.1:port``; how it ended (``vanished`` when the client hung up on purpose)."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)
    try:
        client = await connectProtocol(endpoint, Exchange(reactor, pieces, **misbehaviour))
    except Exception:  # refused or timed out connecting: the proxy is not there
        return Ended(CUT, "no connection")
    timed_out = []

    def give_up() -> None:
        timed_out.append(True)
        client.transport.abortConnection()

    limit = reactor.callLater(timeout, give_up)
    await client.closed
    if limit.active():
        limit.cancel()
    if client.vanished:
        return Ended(VANISHED)
    outcome = classify(client.received, bool(timed_out), stream)
    return Ended(outcome, error_code(client.received) if outcome == ERROR else None)


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """A whole HTTP/1.1 request that asks for the connection to close after the answer."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat_body(stream: bool, tokens: int) -> bytes:
    """A chat completion request for the simulated nodes."""
    return json.dumps({"model": "blyan-sim-7b", "stream": stream, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "soak"}]}).encode()
