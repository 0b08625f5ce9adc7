"""The Twisted side of admission: requests wait in the fair queue for a slot on a node they may use.

``SlotQueue.wait`` queues a request whose candidates are all at their cap
(``LeasePool.at_cap``). Each lease given back (``slot_freed``, the pools'
``on_slot_freed``) offers the freed slot to the waiters in fair order
(``core.FairQueue.in_order``): each re-asks its own pool with its own route
and excluded nodes, so model, tag, index and ``?api=`` constraints hold and a
draining node's slot is never handed out. The lease is taken at once (the
slot is reserved) and handed to the waiter on the next reactor turn.
A waiter that leaves (``Ticket.leave``) is gone at once; one that waits
``QUEUE_TIMEOUT_MS`` gets 503 ``queue_timeout``; ``close`` answers every
waiter 503 (SIGTERM).
"""

from __future__ import annotations

from typing import Callable, Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from blyanproxy.core import (
    FairQueue,
    ProxyError,
    Route,
    SlotRate,
    Waiter,
    queue_closed_error,
    queue_full_error,
    queue_timeout_error,
)
from blyanproxy.fleet.balancer import Lease, LeasePool


class QueueObserver(Protocol):
    """Where the queue's figures go (``ProxyMetrics``)."""

    def queue_left(self, seconds: float, outcome: str) -> None:
        """A waiter left the queue after ``seconds``: ``served``, ``timeout``, ``gone`` or ``closed``."""

    def queue_rejected(self, reason: str) -> None:
        """A request was refused by admission (``queue_full``, ``queue_timeout``, ``rate_limited``…)."""


@attrs.frozen
class Caller:
    """Who a request is for the queue and the limits: the key's short hash (or client address) and band."""

    key: str
    band: str = "normal"


@attrs.define(eq=False)
class Ticket:
    """One request's place in the queue; ``leave`` when its client goes away."""

    _queue: SlotQueue
    pool: LeasePool
    route: Route
    excluded: frozenset[str]
    granted: Callable[[Lease], None]
    refused: Callable[[ProxyError], None]
    waiter: Waiter[Ticket] | None = None
    timer: IDelayedCall | None = None
    handoff: IDelayedCall | None = None
    lease: Lease | None = None

    def leave(self) -> None:
        """The client left: out of the queue now, and any slot reserved for it is given back."""
        self._queue.left(self)


class SlotQueue:
    """The process's queue of requests waiting for a node slot (see the module docstring)."""

    def __init__(self, clock: IReactorTime, limit: int, timeout: float, observer: QueueObserver | None = None,
                 aging: float = 2.0) -> None:
        self._clock = clock
        self._queue: FairQueue[Ticket] = FairQueue(limit, aging)
        self._rate = SlotRate()
        self.timeout = timeout
        self.observer = observer
        self.closed = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def limit(self) -> int:
        """``QUEUE_MAX``: how many may wait at once."""
        return self._queue.limit

    def depth_by_band(self) -> dict[str, int]:
        """How many wait in each band."""
        return self._queue.depth_by_band()

    def retry_after(self, ahead: int | None = None) -> int:
        """Seconds a client should wait before trying again, from the rate slots free up at."""
        fallback = max(1, int(self.timeout + 0.999))
        return self._rate.retry_after(len(self._queue) if ahead is None else ahead, self._clock.seconds(), fallback)

    def wait(self, pool: LeasePool, route: Route, excluded: frozenset[str], caller: Caller,
             granted: Callable[[Lease], None], refused: Callable[[ProxyError], None]) -> Ticket | None:
        """Queue a request; ``granted(lease)`` when a slot is its, ``refused(error)`` on timeout or close.

        Returns None, having called ``refused`` with 429 ``queue_full``, when no place is free.
        """
        ticket = Ticket(self, pool, route, excluded, granted, refused)
        waiter = None if self.closed else self._queue.push(caller.key, caller.band, self._clock.seconds(), ticket)
        if waiter is None:
            self._rejected("queue_full")
            refused(queue_closed_error() if self.closed else queue_full_error(self.retry_after()))
            return None
        ticket.waiter = waiter
        ticket.timer = self._clock.callLater(self.timeout, self._timed_out, ticket)
        return ticket

    def slot_freed(self) -> None:
        """A lease was given back: offer the slot to the waiters, in fair order."""
        now = self._clock.seconds()
        self._rate.freed(now)
        if not len(self._queue):
            return
        for waiter in self._queue.in_order(now):
            ticket = waiter.item
            lease = ticket.pool.acquire(ticket.route, ticket.excluded)
            if lease is not None:
                self._queue.served(waiter)
                self._stop_timer(ticket)
                self._left(ticket, "served")
                ticket.lease = lease
                ticket.handoff = self._clock.callLater(0, self._hand_over, ticket)
                return

    def close(self) -> None:
        """Answer every waiter 503 and take no more (the proxy is shutting down)."""
        self.closed = True
        for waiter in self._queue.waiters():
            ticket = waiter.item
            self._queue.remove(waiter)
            self._stop_timer(ticket)
            self._left(ticket, "closed")
            ticket.refused(queue_closed_error())

    def left(self, ticket: Ticket) -> None:
        """``ticket``'s client left (``Ticket.leave``)."""
        if ticket.waiter is not None:
            self._queue.remove(ticket.waiter)
            self._stop_timer(ticket)
            self._left(ticket, "gone")
        if ticket.handoff is not None and ticket.handoff.active():
            ticket.handoff.cancel()
            ticket.handoff = None
            lease, ticket.lease = ticket.lease, None
            if lease is not None:
                lease.release()

    def _hand_over(self, ticket: Ticket) -> None:
        ticket.handoff = None
        lease, ticket.lease = ticket.lease, None
        assert lease is not None
        ticket.granted(lease)

    def _timed_out(self, ticket: Ticket) -> None:
        ticket.timer = None
        if ticket.waiter is None:
            return
        self._queue.remove(ticket.waiter)
        self._left(ticket, "timeout")
        self._rejected("queue_timeout")
        ticket.refused(queue_timeout_error(self.retry_after()))

    def _stop_timer(self, ticket: Ticket) -> None:
        if ticket.timer is not None and ticket.timer.active():
            ticket.timer.cancel()
        ticket.timer = None

    def _left(self, ticket: Ticket, outcome: str) -> None:
        waiter, ticket.waiter = ticket.waiter, None
        if self.observer is not None and waiter is not None:
            self.observer.queue_left(self._clock.seconds() - waiter.since, outcome)

    def _rejected(self, reason: str) -> None:
        if self.observer is not None:
            self.observer.queue_rejected(reason)
