"""Answers that take time: token streams paced by the node's clock, delayed and held answers, and a
byte body that goes only as fast as the client reads.

Every timer here belongs to one request and is cancelled when that request's client goes away
(``request.notifyFinish()`` errbacks), so nothing outlives its connection.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import attrs
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
    from twisted.python.failure import Failure
    from twisted.web.server import Request

    from blyanproxy.devnode.config import DevNodeConfig
    from blyanproxy.devnode.node import DevNodeStats
    from blyanproxy.devnode.wire import ChatFormat, GenerateFormat


_SLACK = 1e-9  # seconds; absorbs float error so a token due "exactly now" counts as due


@attrs.frozen
class TokenSchedule:
    """When each token of one generation is due, in seconds after the request arrived.

    Token ``i`` is due at ``ttft + i * interval``: the first after the time to first token, then
    one every ``1 / tokens_per_second``.
    """

    count: int
    ttft: float
    interval: float

    @classmethod
    def for_config(cls, config: DevNodeConfig, count: int) -> TokenSchedule:
        """The schedule of ``count`` tokens at the pace ``config`` sets."""
        return cls(count, config.ttft_ms / 1000.0, 1.0 / config.tokens_per_second)

    def due_at(self, index: int) -> float:
        """Seconds after the start when token ``index`` (from 0) is due."""
        return self.ttft + index * self.interval

    def due_by(self, elapsed: float) -> int:
        """How many tokens are due ``elapsed`` seconds after the start (0 to ``count``)."""
        if elapsed + _SLACK < self.ttft:
            return 0
        return min(self.count, 1 + math.floor((elapsed - self.ttft + _SLACK) / self.interval))

    @property
    def duration(self) -> float:
        """Seconds from the start to the last token."""
        return self.due_at(max(self.count - 1, 0))


class TokenStream:
    """One generation written to a request as its tokens come due on the clock.

    It holds one timer at a time and ends in one of three ways, each counted in the stats:
    completed (every token, then the format's ending), dropped (``drop_after`` tokens written, then
    at the next token's time the TCP connection is aborted mid-body) or aborted (the client went
    away first; the timer is cancelled and the time recorded in ``aborted_at``).
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        schedule: TokenSchedule,
        fmt: ChatFormat | GenerateFormat,
        stats: DevNodeStats,
        drop_after: int | None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._schedule = schedule
        self._fmt = fmt
        self._stats = stats
        self._drop_after = drop_after
        self._written = 0
        self._open = False
        self._timer: IDelayedCall | None = None
        self._started = 0.0

    def start(self) -> None:
        """Send the response headers now and schedule the first token."""
        self._open = True
        self._started = self._clock.seconds()
        self._stats.open_streams += 1
        self._stats.most_open_streams = max(self._stats.most_open_streams, self._stats.open_streams)
        self._stats.streams_started += 1
        self._request.setHeader(b"content-type", self._fmt.content_type)
        self._request.setHeader(b"cache-control", b"no-cache")
        self._request.write(b"")
        self._request.notifyFinish().addErrback(self._client_gone)
        self._schedule_next()

    def _schedule_next(self) -> None:
        due = self._started + self._schedule.due_at(self._written)
        self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._written == self._drop_after:
            self._close()
            self._stats.streams_dropped += 1
            cast("ITCPTransport", self._request.transport).abortConnection()  # a node listens on TCP
            return
        due = self._schedule.due_by(self._clock.seconds() - self._started)
        stop = min(max(due, self._written + 1), self._schedule.count)
        if self._drop_after is not None:
            stop = min(stop, self._drop_after)
        data = b"".join(self._fmt.token(index) for index in range(self._written, stop))
        self._written = stop
        if stop == self._schedule.count:
            self._write(data + self._fmt.end())
            self._close()
            self._stats.streams_completed += 1
            self._request.finish()
        else:
            self._write(data)
            self._schedule_next()

    def _write(self, data: bytes) -> None:
        self._stats.bytes_sent += len(data)
        self._request.write(data)

    def _close(self) -> None:
        self._open = False
        self._stats.open_streams -= 1

    def _client_gone(self, reason: Failure) -> None:
        if not self._open:  # we dropped the connection ourselves
            return
        self._close()
        self._stats.streams_aborted += 1
        self._stats.aborted_at.append(self._clock.seconds())
        if self._timer is not None:
            self._timer.cancel()


def answer_later(request: Request, clock: IReactorTime, delay: float, body: bytes) -> None:
    """Write ``body`` and finish ``request`` after ``delay`` seconds, unless the client goes away
    first, which cancels the timer. Status and other headers must already be set."""

    def answer() -> None:
        request.write(body)
        request.finish()

    request.setHeader(b"content-length", b"%d" % len(body))
    timer = clock.callLater(delay, answer)
    request.notifyFinish().addErrback(lambda _: timer.cancel())


def hold(request: Request, stats: DevNodeStats) -> None:
    """Never answer ``request``; it counts in ``stats.hanging`` until its client goes away."""

    def gone(reason: Failure) -> None:
        stats.hanging -= 1

    stats.hanging += 1
    request.notifyFinish().addErrback(gone)


_PATTERN = bytes(range(256)) * 256  # 64 KiB, the size of one write


@implementer(IPullProducer)
class PatternBody:
    """A pull producer writing ``size`` bytes of a fixed pattern in 64 KiB writes.

    Twisted asks for the next write only once the previous ones left its buffer, so a client that
    does not read stalls the node, and ``stats.bytes_sent`` shows how far it got.
    """

    def __init__(self, request: Request, size: int, stats: DevNodeStats) -> None:
        self._request = request
        self._remaining = size
        self._stats = stats

    def start(self) -> None:
        """Register with the request; Twisted then pulls the body out write by write."""
        self._request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        """Write the next piece; after the last one, finish the response."""
        piece = _PATTERN[: self._remaining]
        self._remaining -= len(piece)
        self._stats.bytes_sent += len(piece)
        self._request.write(piece)
        if not self._remaining:
            self._request.unregisterProducer()
            self._request.finish()

    def stopProducing(self) -> None:
        """The client went away: Twisted stops pulling, and there is nothing else to release."""
