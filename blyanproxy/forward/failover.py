"""The Twisted side of the attempt machine: leases from a pool, the retry delay, failures reported.

``core.attempts.Attempts`` decides; a ``Failover`` carries its decisions out
for one request (HTTP or a WebSocket handshake): it takes a ``Lease`` from the
pool for each ``Pick``, waits out ``RETRY_DELAY_MS`` on the clock, holds a
failed attempt against its node (node health, the failed-attempts metric, a
log line), and calls its owner back to ``try_node`` or ``give_up``.
``classify_failure`` turns a connection's failure into the machine's word.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet import error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from blyanproxy.core import (
    BAD_RESPONSE,
    CONNECT_FAILED,
    CONNECT_TIMEOUT,
    NO_RESPONSE,
    REFUSED,
    TLS_FAILED,
    AttemptFailure,
    Attempts,
    Decision,
    GiveUp,
    Pick,
    ProxyError,
    Relay,
    Route,
    Try,
)
from blyanproxy.fleet import Caller, Lease, LeasePool, SlotQueue, Ticket
from blyanproxy.logs import logger
from blyanproxy.upstream import ProtocolError

log = logger("proxy")


class AttemptReporter(Protocol):
    """Where failed attempts are counted (the ``TrafficRecorder``)."""

    def attempt_failed(self, node: str, reason: str) -> None:
        """One attempt on ``node`` failed for ``reason`` before any byte reached the client."""


def classify_failure(failure: Failure) -> AttemptFailure:
    """The ``AttemptFailure`` for a connection that failed before the node's answer began."""
    value = failure.value
    if isinstance(value, error.TimeoutError):
        return CONNECT_TIMEOUT
    if isinstance(value, error.ConnectionRefusedError):
        return REFUSED
    if isinstance(value, (error.DNSLookupError, error.ConnectError)):
        return CONNECT_FAILED
    if isinstance(value, ProtocolError):
        return BAD_RESPONSE
    if "SSL" in type(value).__module__ or "ssl" in type(value).__module__:
        return TLS_FAILED
    return NO_RESPONSE


class Failover:
    """Carries out one request's ``Attempts`` decisions (see the module docstring).

    ``try_node(lease, fresh)`` sends the next attempt (``fresh``: on a new
    connection); ``give_up(error)`` answers the client. ``lease`` is the
    current attempt's (None before the first).
    With a ``queue`` (``QUEUE_MAX`` > 0), a first pick that finds every
    candidate at its cap waits there for a slot (``caller`` says whose turn).
    """

    def __init__(self, attempts: Attempts, pool: LeasePool, route: Route, clock: IReactorTime,
                 reporter: AttemptReporter, try_node: Callable[[Lease, bool], None],
                 give_up: Callable[[ProxyError], None], queue: SlotQueue | None = None,
                 caller: Caller | None = None) -> None:
        self._attempts = attempts
        self._pool = pool
        self._route = route
        self._clock = clock
        self._reporter = reporter
        self._try_node = try_node
        self._give_up = give_up
        self.lease: Lease | None = None
        self._number = 0  # the current attempt's
        self._delay: IDelayedCall | None = None
        self._queue = queue
        self._caller = caller
        self._ticket: Ticket | None = None

    @property
    def count(self) -> int:
        """How many nodes have been tried."""
        return self._attempts.count

    @property
    def waiting(self) -> bool:
        """True while the retry delay runs or the request is queued (no attempt is under way)."""
        return self._delay is not None or self._ticket is not None

    def start(self) -> None:
        """Make the first attempt."""
        self._carry_out(self._attempts.start())

    def failed(self, failure: AttemptFailure, reused: bool = False, bytes_received: int = 0) -> None:
        """The current attempt failed before its answer began (see ``Attempts.failed``)."""
        self._carry_out(self._attempts.failed(failure, reused, bytes_received))

    def answered(self, status: int) -> bool:
        """The current attempt's node answered ``status``: True to relay it, False when another
        node takes the request instead (``try_node`` has been called)."""
        return self._carry_out(self._attempts.answered(status))

    def unusable(self, failure: AttemptFailure) -> None:
        """The node's answer cannot be passed on: hold it against the node and give up."""
        self._carry_out(self._attempts.unusable(failure))

    def cancel(self) -> None:
        """The client left: stop waiting out the retry delay, or leave the queue."""
        if self._delay is not None:
            self._delay.cancel()
            self._delay = None
        if self._ticket is not None:
            ticket, self._ticket = self._ticket, None
            ticket.leave()

    def _carry_out(self, decision: Decision, picked: Lease | None = None) -> bool:
        """Do what ``decision`` says (``picked``: the lease a ``Pick`` got); True for ``Relay``."""
        if isinstance(decision, Relay):
            return True
        if decision.failed is not None:
            self._hold_against_node(decision.failed)
        if isinstance(decision, Pick):
            if decision.delay:
                self._delay = self._clock.callLater(decision.delay, self._pick, decision)
            else:
                return self._pick(decision)
        elif isinstance(decision, Try):
            if picked is not None:
                self.lease = picked
            assert self.lease is not None
            self._number = decision.attempt
            self._try_node(self.lease, decision.fresh)
        elif isinstance(decision, GiveUp):
            self._give_up(decision.error)
        return False

    def _pick(self, pick: Pick) -> bool:
        self._delay = None
        lease = self._pool.acquire(self._route, pick.excluded)
        if lease is None and self._may_queue(pick):
            assert self._queue is not None and self._caller is not None
            self._ticket = self._queue.wait(self._pool, self._route, pick.excluded, self._caller,
                                            self._granted, self._queue_refused)
            return False
        return self._carry_out(self._attempts.picked(lease.node.id if lease is not None else None), lease)

    def _may_queue(self, pick: Pick) -> bool:
        """Whether this pick waits for a slot: the first, with a queue, every candidate at its cap."""
        return (self._queue is not None and self._caller is not None and self._attempts.count == 0
                and self._pool.at_cap(self._route, pick.excluded))

    def _granted(self, lease: Lease) -> None:
        self._ticket = None
        self._carry_out(self._attempts.picked(lease.node.id), lease)

    def _queue_refused(self, err: ProxyError) -> None:
        self._ticket = None
        self._give_up(err)

    def _hold_against_node(self, reason: str) -> None:
        lease = self.lease
        assert lease is not None
        log.info("attempt {attempt} on node {node} failed: {reason}",
                 attempt=self._number, node=lease.node.name, reason=reason)
        lease.failed(reason)
        self._reporter.attempt_failed(lease.node.name, reason)
