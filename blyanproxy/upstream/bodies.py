"""Reading a treq/Agent response body with a size cap (health answers, workloads lists)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss


class BodyTooLarge(Exception):
    """A response body over the reader's limit."""


class _CappedReader(Protocol):
    """Reads a body up to ``limit`` bytes; more, or a cancellation, closes the connection."""

    def __init__(self, done: defer.Deferred, limit: int, keep: bool) -> None:
        self._done = done
        self._limit = limit
        self._chunks = [] if keep else None
        self._seen = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._seen += len(data)
        if self._seen > self._limit:
            self.transport.stopProducing()
            self._done.errback(BodyTooLarge(f"the body exceeds {self._limit} bytes"))
        elif self._chunks is not None:
            self._chunks.append(data)

    def connectionLost(self, reason) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks or ()))
        else:
            self._done.errback(reason)


def read_capped(response, limit: int, keep: bool = True) -> defer.Deferred:
    """The body of ``response`` (``b""`` unless ``keep``), failing with ``BodyTooLarge``
    past ``limit`` bytes, or with the transport's error when the body is cut short.
    Cancelling the Deferred closes the connection."""
    reader = None
    done = defer.Deferred(lambda _: reader.transport.stopProducing() if reader.transport else None)
    reader = _CappedReader(done, limit, keep)
    response.deliverBody(reader)
    return done
