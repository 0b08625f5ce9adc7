"""A small client of etcd v3's JSON gateway (``/v3/...``), on treq.

Every call has a timeout; every failure (refused, timed out, an error
answer, a body that is not JSON) is a ``StoreUnavailable`` naming the call,
never the values. ``watch`` opens the streaming ``/v3/watch`` call and hands
each newline-delimited JSON message to a callback.
"""

from __future__ import annotations

import json
from typing import Callable

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from blyanproxy.core import StoreUnavailable

#: Longest watch message accepted without a newline (a watch batch of many node changes).
MAX_LINE = 16 * 1024 * 1024


class EtcdGateway:
    """Calls to one etcd endpoint; ``close()`` at shutdown."""

    def __init__(self, reactor, base_url: str, timeout: float) -> None:
        self._reactor = reactor
        self._base = base_url
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._http = HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self._pool))

    def call(self, path: str, body: dict) -> Deferred:
        """POST ``body`` to ``/v3/<path>``; fires with the answer's JSON object."""

        def answered(response):
            return response.content().addCallback(lambda raw: _document(path, response.code, raw))

        requested = self._http.post(f"{self._base}/v3/{path}", json=body, unbuffered=True)
        requested.addCallback(answered)
        requested.addTimeout(self._timeout, self._reactor)
        return requested.addErrback(_unavailable, path)

    def watch(self, body: dict, on_message: Callable[[dict], None]) -> WatchStream:
        """Open ``/v3/watch`` with ``body``; ``on_message`` gets every message until the stream ends."""
        return WatchStream(self._http, f"{self._base}/v3/watch", body, on_message, self._reactor, self._timeout)

    def close(self) -> Deferred:
        """Close idle connections to etcd."""
        return self._pool.closeCachedConnections()


class WatchStream:
    """One open watch call; ``ended`` fires (with a ``StoreUnavailable`` failure) when it stops."""

    def __init__(self, http, url: str, body: dict, on_message, reactor, timeout: float) -> None:
        self.ended: Deferred = Deferred()
        self._lines: _Lines | None = None
        self._requested = http.post(url, json=body, unbuffered=True)
        self._requested.addTimeout(timeout, reactor)
        self._requested.addCallback(self._opened, on_message)
        self._requested.addErrback(_unavailable, "watch")
        self._requested.addErrback(self._finish)

    def _opened(self, response, on_message) -> None:
        if response.code != 200:
            raise StoreUnavailable(f"etcd refused the watch (HTTP {response.code})")
        self._lines = _Lines(on_message, self._finish)
        response.deliverBody(self._lines)

    def _finish(self, failure) -> None:
        if not self.ended.called:
            self.ended.errback(failure)

    def stop(self) -> None:
        """Close the stream (``ended`` then fires)."""
        if self._lines is None:
            self._requested.cancel()
        elif self._lines.transport is not None:
            self._lines.transport.stopProducing()


class _Lines(Protocol):
    """Splits a streamed body into JSON messages, one per line."""

    def __init__(self, on_message, finish) -> None:
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
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        why = "etcd ended the watch" if reason.check(ResponseDone) else "the watch connection to etcd was lost"
        self._finish(StoreUnavailable(why))


def _document(path: str, code: int, raw: bytes) -> dict:
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if code != 200 or not isinstance(document, dict):
        message = document.get("error") or document.get("message") if isinstance(document, dict) else None
        raise StoreUnavailable(f"etcd answered {path} with HTTP {code}" + (f": {message}" if message else ""))
    return document


def _unavailable(failure, path: str):
    if failure.check(StoreUnavailable):
        return failure
    if failure.check(CancelledError):
        raise StoreUnavailable(f"etcd did not answer {path} in time")
    raise StoreUnavailable(f"etcd is unreachable ({failure.type.__name__})")
