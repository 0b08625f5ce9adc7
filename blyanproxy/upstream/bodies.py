"""Reading a treq/Agent response body with a size cap (health answers, workloads lists)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

if TYPE_CHECKING:
    from twisted.python.failure import Failure
    from twisted.web.iweb import IResponse


class BodyTooLarge(Exception):
    """A response body over the reader's limit."""


class _CappedReader(Protocol):
    """Reads a body up to ``limit`` bytes; more, or a cancellation, closes the connection."""

    def __init__(self, done: defer.Deferred[bytes], limit: int, keep: bool) -> None:
        self._done = done
        self._limit = limit
        self._chunks: list[bytes] | None = [] if keep else None
        self._seen = 0

    def stop(self) -> None:
        """Close the connection the body comes on, if it has begun."""
        if self.transport:
            self._producer().stopProducing()

    def _producer(self) -> IPushProducer:
        # A response body's protocol is connected to an IPushProducer (IResponse.deliverBody),
        # which Twisted's ``Protocol.transport: ITransport`` does not say.
        return cast(IPushProducer, self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._seen += len(data)
        if self._seen > self._limit:
            self._producer().stopProducing()
            self._done.errback(BodyTooLarge(f"the body exceeds {self._limit} bytes"))
        elif self._chunks is not None:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks or ()))
        else:
            self._done.errback(reason)


def read_capped(response: IResponse, limit: int, keep: bool = True) -> defer.Deferred[bytes]:
    """The body of ``response`` (``b""`` unless ``keep``), failing with ``BodyTooLarge``
    past ``limit`` bytes, or with the transport's error when the body is cut short.
    Cancelling the Deferred closes the connection."""
    done: defer.Deferred[bytes] = defer.Deferred(lambda _: reader.stop())
    reader = _CappedReader(done, limit, keep)
    response.deliverBody(reader)
    return done
