"""A small client of etcd v3's JSON gateway (``/v3/...``), on treq.

Every call has a timeout; every failure (refused, timed out, an error
answer, a body that is not JSON) is a ``StoreUnavailable`` naming the call,
never the values. ``watch`` opens the streaming ``/v3/watch`` call and hands
each newline-delimited JSON message to a callback.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, cast

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone

from blyanproxy.core import StoreUnavailable
from blyanproxy.twistedinternals import quiet_connection_pool

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.iweb import IResponse

#: A JSON object as etcd's gateway sends and takes it.
Document = dict[str, Any]

#: Longest watch message accepted without a newline (a watch batch of many node changes).
MAX_LINE = 16 * 1024 * 1024


class EtcdGateway:
    """Calls to one etcd endpoint; ``close()`` at shutdown."""

    def __init__(self, reactor: IReactorTime, base_url: str, timeout: float) -> None:
        """``reactor`` times every call out, and connects (``IReactorTCP``)."""
        self._reactor = reactor
        self._base = base_url
        self._timeout = timeout
        self._pool = quiet_connection_pool(reactor, persistent=True)  # no log line per connection
        self._pool.maxPersistentPerHost = 4
        self._http = HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self._pool))

    def call(self, path: str, body: Document) -> Deferred[Document]:
        """POST ``body`` to ``/v3/<path>``; fires with the answer's JSON object."""

        def answered(response) -> Deferred[Document]:  # a treq response, whose class treq keeps private
            return response.content().addCallback(lambda raw: _document(path, response.code, raw))

        answer = self._http.post(f"{self._base}/v3/{path}", json=body, unbuffered=True).addCallback(answered)
        answer.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_too_slow(path))
        return answer.addErrback(_unavailable, path)

    def watch(self, body: Document, on_message: Callable[[Document], None]) -> WatchStream:
        """Open ``/v3/watch`` with ``body``; ``on_message`` gets every message until the stream ends."""
        return WatchStream(self._http, f"{self._base}/v3/watch", body, on_message, self._reactor, self._timeout)

    def close(self) -> Deferred[None]:
        """Close idle connections to etcd."""
        return self._pool.closeCachedConnections()


class WatchStream:
    """One open watch call; ``ended`` fires (with a ``StoreUnavailable`` failure) when it stops."""

    def __init__(
        self,
        http: HTTPClient,
        url: str,
        body: Document,
        on_message: Callable[[Document], None],
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self.ended: Deferred[None] = Deferred()
        self._lines: _Lines | None = None
        self._requested = http.post(url, json=body, unbuffered=True)
        self._requested.addTimeout(timeout, clock, onTimeoutCancel=_too_slow("watch"))
        self._requested.addCallback(self._opened, on_message)
        self._requested.addErrback(_unavailable, "watch")
        self._requested.addErrback(self._finish)

    def _opened(self, response: IResponse, on_message: Callable[[Document], None]) -> None:
        if response.code != 200:
            raise StoreUnavailable(f"etcd refused the watch (HTTP {response.code})")
        self._lines = _Lines(on_message, self._finish)
        response.deliverBody(self._lines)

    def _finish(self, failure: Failure | StoreUnavailable) -> None:
        if not self.ended.called:
            self.ended.errback(failure)

    def stop(self) -> None:
        """Close the stream (``ended`` then fires)."""
        if self._lines is None:
            self._requested.cancel()
        elif self._lines.transport is not None:
            self._lines.stop()


class _Lines(Protocol):
    """Splits a streamed body into JSON messages, one per line."""

    def __init__(
        self, on_message: Callable[[Document], None], finish: Callable[[StoreUnavailable], None]
    ) -> None:
        self._on_message = on_message
        self._finish = finish
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._on_message(json.loads(line))
        if len(self._buffer) > MAX_LINE:
            self.stop()

    def stop(self) -> None:
        """Stop the body: its connection closes, then ``connectionLost`` ends the watch."""
        # A response body's protocol is connected to an IPushProducer (IResponse.deliverBody),
        # which Twisted's ``Protocol.transport: ITransport`` does not say.
        cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        why = "etcd ended the watch" if reason.check(ResponseDone) else "the watch connection to etcd was lost"
        self._finish(StoreUnavailable(why))


def _document(path: str, code: int, raw: bytes) -> Document:
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if code != 200 or not isinstance(document, dict):
        message = document.get("error") or document.get("message") if isinstance(document, dict) else None
        raise StoreUnavailable(f"etcd answered {path} with HTTP {code}" + (f": {message}" if message else ""))
    return document


def _too_slow(path: str) -> Callable[[object, float], Failure]:
    """What a call cut short by its timeout fails with, whatever the cancelled request reported."""

    def timed_out(result: object, timeout: float) -> Failure:
        return Failure(StoreUnavailable(f"etcd did not answer {path} in time"))

    return timed_out


def _unavailable(failure: Failure, path: str) -> Failure:
    if failure.check(StoreUnavailable):
        return failure
    raise StoreUnavailable(f"etcd is unreachable ({type(failure.value).__name__})")
