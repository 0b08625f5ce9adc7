"""Streaming a node's response body to the client, with flow control and idle timers.

``BodyRelay`` receives a node's body from the upstream connection. It registers
itself as the client request's streaming producer and forwards pause, resume
and stop to the upstream connection, so a client that reads slowly stops the
proxy reading from the node (memory stays flat) and a client that leaves
closes the upstream connection.

One timer serves two jobs: it cuts a body that stays silent longer than the
idle timeout (time spent paused by the client does not count), and on an SSE
stream it writes a comment line after ``sse_keepalive`` quiet seconds, at an
event boundary only.

A stream that breaks off or goes idle ends with an error its client's parser
reads before the connection is cut: an SSE ``event: error`` (at an event
boundary, or after closing the event under way), or on an NDJSON stream
(Ollama's) one more JSON line, when the last line is complete. Its data is
the error document in the shape the client's path calls for
(``error_document``), which the openai SDK's stream raises as ``APIError`` and
the ollama client as ``ResponseError``.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.web.server import Request
from zope.interface import implementer

from blyanproxy.core import ProxyError, UsageTail

#: How a relayed body ended, passed to the ``on_end`` callback.
COMPLETE = "complete"
CLIENT_GONE = "client_gone"
UPSTREAM_BROKE = "upstream_broke"
IDLE_TIMEOUT = "idle_timeout"

SSE_KEEPALIVE_COMMENT = b": keep-alive\n\n"


def plain_error_document(code: str, message: str) -> bytes:
    """The proxy's own JSON error shape, for a stream that broke off as ``code`` says."""
    return ProxyError(502, code, message).body()


def sse_error_event(document: bytes) -> bytes:
    """An SSE ``error`` event carrying a JSON error ``document``."""
    return b"event: error\ndata: " + document + b"\n\n"


def cut_short(request: Request) -> None:
    """Close the client's connection under ``request``, so its response reads as broken, never complete."""
    transport = request.transport
    assert transport is not None  # a request keeps the transport of the connection it came on
    transport.loseConnection()


class ChunkPosition(Protocol):
    """Where a chunked body being passed on raw stands (the upstream connection tells)."""

    @property
    def at_chunk_boundary(self) -> bool:
        """True between two chunks, where the proxy may put a chunk of its own."""


@implementer(IPushProducer)
class BodyRelay:
    """Copies one response body to one client request; calls ``on_end(how, bytes_sent)`` once.

    ``upstream`` (the node's connection) is paused, resumed and stopped by the
    client's pace. With ``raw_chunks`` (what tells where the node's chunked body
    stands), the node's chunk framing is passed to the client as it is, saving a
    decode and re-encode per event; the client's response must then be chunked
    too (HTTP/1.1, no length). A broken SSE (``is_sse``) or NDJSON (``ndjson``)
    stream ends with an error frame whose data ``error_document(code, message)``
    makes (see the module docstring).
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        upstream: IPushProducer,
        idle_timeout: float,
        sse_keepalive: float,
        is_sse: bool,
        on_end: Callable[[str, int], None],
        raw_chunks: ChunkPosition | None = None,
        ndjson: bool = False,
        error_document: Callable[[str, str], bytes] = plain_error_document,
    ) -> None:
        self._request = request
        self._upstream = upstream
        self._raw_chunks = raw_chunks
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._keepalive = sse_keepalive if is_sse and sse_keepalive > 0 else 0.0
        self.is_sse = is_sse
        self._ndjson = ndjson and not is_sse
        self._error_document = error_document
        self._on_end = on_end
        self._paused = False
        self._ended = False
        self._at_event_boundary = True
        self._timer: IDelayedCall | None = None
        self._forward: Callable[[bytes], None] = request.write
        self.usage_tail = UsageTail()  # the body's end, for the token usage the node reports
        now = clock.seconds()
        self._last_data = now
        self._last_write = now
        self._bytes_sent = 0

    # -- the node's side -----------------------------------------------------

    def start(self) -> None:
        """Begin relaying: become the client request's producer and start the idle timer."""
        request = self._request
        request.registerProducer(self, True)
        if self._raw_chunks is not None:
            request.write(b"")  # the head, announcing chunked framing
            transport = request.channel.transport
            assert transport is not None  # connected: the head was just written
            self._forward = transport.write  # the tracked connection writes through
        self._schedule()

    def dataReceived(self, data: bytes) -> None:
        """A piece of the node's body: on to the client."""
        if self._ended:
            return
        now = self._clock.seconds()
        self._last_data = self._last_write = now
        if self.is_sse:
            if self._raw_chunks is not None:
                self._at_event_boundary = data.endswith(b"\n\n\r\n")
            else:
                self._at_event_boundary = data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")
        elif self._ndjson:
            self._at_event_boundary = data.endswith(b"\n\r\n" if self._raw_chunks is not None else b"\n")
        self._bytes_sent += len(data)
        self.usage_tail.feed(data)
        self._forward(data)

    body_data = dataReceived

    def _emit(self, data: bytes) -> bool:
        """Write bytes of the proxy's own (a comment, an error event); False if it cannot now."""
        if self._raw_chunks is None:
            self._request.write(data)
            return True
        if not self._raw_chunks.at_chunk_boundary:
            return False
        self._forward(b"%x\r\n%s\r\n" % (len(data), data))
        return True

    def response_ended(self, error: str | None) -> None:
        """The node's body is complete (``error`` None) or broke off."""
        if self._ended:
            return
        if error is None:
            self._end(COMPLETE)
        else:
            self._end(UPSTREAM_BROKE, f"the node's response broke off ({error})")

    # -- IPushProducer: the client's side -------------------------------------

    def pauseProducing(self) -> None:
        """The client cannot take more now: stop reading from the node."""
        self._paused = True
        self._upstream.pauseProducing()

    def resumeProducing(self) -> None:
        """The client reads again: so does the relay."""
        self._paused = False
        self._last_data = self._clock.seconds()
        self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        """The client's connection is going away (``client_gone``)."""
        self.client_gone()

    # -- endings --------------------------------------------------------------

    def client_gone(self) -> None:
        """The client went away: close the upstream connection and stop."""
        if self._ended:
            return
        self._ended = True
        self._cancel_timer()
        self._upstream.stopProducing()
        self._on_end(CLIENT_GONE, self._bytes_sent)

    def _end(self, how: str, message: str | None = None) -> None:
        self._ended = True
        self._cancel_timer()
        request = self._request
        if request.channel is not None:
            request.unregisterProducer()
            if how == COMPLETE:
                if self._raw_chunks is not None:
                    request.chunked = 0  # the node's last chunk has been passed on already
                request.finish()
            else:
                self._fail_client(how, message)
        self._on_end(how, self._bytes_sent)

    def _fail_client(self, how: str, message: str | None) -> None:
        """End the client's response so that it reads as failed, never as complete."""
        document = self._error_document(how, message or how)
        if self.is_sse:
            event = sse_error_event(document)
            self._emit(event if self._at_event_boundary else b"\n\n" + event)
        elif self._ndjson and self._at_event_boundary:
            self._emit(document + b"\n")
        cut_short(self._request)

    # -- the idle / keep-alive timer ------------------------------------------

    def _schedule(self) -> None:
        deadline = self._last_data + self._idle_timeout
        if self._keepalive:
            deadline = min(deadline, self._last_write + self._keepalive)
        delay = max(deadline - self._clock.seconds(), 0.0)
        self._timer = self._clock.callLater(delay, self._tick)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tick(self) -> None:
        self._timer = None
        if self._ended:
            return
        now = self._clock.seconds()
        if self._paused:
            self._last_data = now
        elif now - self._last_data >= self._idle_timeout:
            self._upstream.stopProducing()
            self._end(IDLE_TIMEOUT, f"the node sent nothing for {self._idle_timeout:g} s")
            return
        if self._keepalive and now - self._last_write >= self._keepalive:
            # Mid-event or while the client is not reading, skip this round.
            if self._at_event_boundary and not self._paused:
                self._emit(SSE_KEEPALIVE_COMMENT)
            self._last_write = now
        self._schedule()
