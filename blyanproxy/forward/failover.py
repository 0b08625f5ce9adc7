"""The Twisted side of the attempt machine: leases from a pool, the retry delay, failures reported.

``core.attempts.Attempts`` decides; a ``Failover`` carries its decisions out
for one request (HTTP or a WebSocket handshake): it takes a ``Lease`` from the
pool for each ``Pick``, waits out ``RETRY_DELAY_MS`` on the clock, holds a
failed attempt against its node (node health, the failed-attempts metric, a
log line), and calls its owner back to ``try_node`` or ``give_up``. Its
reporter (the request's ``RequestTally``) hears each attempt start and fail:
the attempt events tracing listens to.
``classify_failure`` turns a connection's failure into the machine's word.

While an attempt waits for its answer, the Failover watches its node
(``NodeStats.watch_out``): when the node goes down or is ejected, it asks its
owner to ``abandon`` the attempt and fails over at once (``NODE_OUT``), since
nothing has reached the client yet. The watch ends when the owner reports the
attempt's fate (``failed``, ``answered``, ``settled``, ``unusable``) or ``cancel``.
"""

from __future__ import annotations

import functools
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
    Node,
    Pick,
    ProxyError,
    Relay,
    Route,
    Try,
)
from blyanproxy.fleet import Caller, Lease, LeasePool, SlotQueue, Ticket
from blyanproxy.logs import debugging, logger
from blyanproxy.upstream import ProtocolError

log = logger("proxy")

#: An attempt abandoned because its node went down or was ejected while it waited for the answer.
NODE_OUT = AttemptFailure(
    "node_out", ProxyError(502, "upstream_failed", "the node went out of service before it answered"))


class AttemptReporter(Protocol):
    """Who hears of each attempt (the request's ``RequestTally``)."""

    def attempt_started(self, node: Node, number: int) -> None:
        """Attempt ``number`` goes to ``node`` (a fresh connection to the same node is the same attempt)."""

    def attempt_failed(self, node: str, reason: str) -> None:
        """One attempt on ``node`` failed for ``reason`` before any byte reached the client."""

    def queue_waited(self, since: float) -> None:
        """The request waited in the admission queue from ``since`` until now."""


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


def _ignored(*_: object) -> None:
    """A callback after ``Failover.let_go``: nothing is tried, answered or abandoned."""


class Failover:
    """Carries out one request's ``Attempts`` decisions (see the module docstring).

    ``try_node(lease, fresh)`` sends the next attempt (``fresh``: on a new
    connection); ``give_up(error)`` answers the client; ``abandon()`` drops
    the current attempt, whose node went out while it waited (nothing of it is
    reported afterwards). ``lease`` is the current attempt's (None before the first).
    With a ``queue`` (``QUEUE_MAX`` > 0), a first pick that finds every
    candidate at its cap waits there for a slot (``caller`` says whose turn).
    """

    def __init__(self, attempts: Attempts, pool: LeasePool, route: Route, clock: IReactorTime,
                 reporter: AttemptReporter, try_node: Callable[[Lease, bool], None],
                 give_up: Callable[[ProxyError], None], abandon: Callable[[], None],
                 queue: SlotQueue | None = None, caller: Caller | None = None) -> None:
        self._attempts = attempts
        self._pool = pool
        self._route = route
        self._clock = clock
        self._reporter = reporter
        self._try_node = try_node
        self._give_up = give_up
        self._abandon = abandon
        self.lease: Lease | None = None
        self._number = 0  # the current attempt's
        self._delay: IDelayedCall | None = None
        self._unwatch: Callable[[], None] | None = None  # while the current attempt waits for its answer
        self._queue = queue
        self._caller = caller
        self._ticket: Ticket | None = None
        self._queued_at = 0.0  # when the request joined the admission queue

    def let_go(self) -> None:
        """The exchange is over: forget its callbacks (they hold it), so nothing calls it again."""
        self._try_node = self._give_up = self._abandon = _ignored

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
        self._stop_watching()
        self._carry_out(self._attempts.failed(failure, reused, bytes_received))

    def answered(self, status: int) -> bool:
        """The current attempt's node answered ``status``: True to relay it, False when another
        node takes the request instead (``try_node`` has been called)."""
        self._stop_watching()
        decision = self._attempts.answered(status)
        if isinstance(decision, Pick) and self.lease is not None and debugging("proxy"):
            log.debug("{node} answered {status} (RETRY_ON_STATUS): another node first, if one is free",
                      node=self.lease.node.name, status=status)
        return self._carry_out(decision)

    def settled(self) -> None:
        """The current attempt's answer goes to the client, whatever it is (a WebSocket handshake's)."""
        self._stop_watching()

    def unusable(self, failure: AttemptFailure) -> None:
        """The node's answer cannot be passed on: hold it against the node and give up."""
        self._stop_watching()
        self._carry_out(self._attempts.unusable(failure))

    def cancel(self) -> None:
        """The client left: stop waiting out the retry delay or leave the queue, and stop watching the node."""
        self._stop_watching()
        if self._delay is not None:
            self._delay.cancel()
            self._delay = None
        if self._ticket is not None:
            ticket, self._ticket = self._ticket, None
            ticket.leave()

    def _watch(self, lease: Lease) -> None:
        self._stop_watching()
        self._unwatch = lease.stats.watch_out(functools.partial(self._node_out, lease))

    def _stop_watching(self) -> None:
        if self._unwatch is not None:
            unwatch, self._unwatch = self._unwatch, None
            unwatch()

    def _node_out(self, lease: Lease, why: str) -> None:
        """``lease``'s node went ``why`` (down, ejected) while its attempt waited: fail over."""
        if lease is not self.lease or self._unwatch is None:
            return  # told late (the node went out twice at once): the attempt has moved on already
        log.info("node {node} is {why}: attempt {attempt}, still waiting for its answer, fails over",
                 node=lease.node.name, why=why, attempt=self._number)
        self._stop_watching()
        self._abandon()
        self.failed(NODE_OUT)

    def _carry_out(self, decision: Decision, picked: Lease | None = None) -> bool:
        """Do what ``decision`` says (``picked``: the lease a ``Pick`` got); True for ``Relay``."""
        if isinstance(decision, Relay):
            return True
        if decision.failed is not None:
            self._hold_against_node(decision.failed)
        if debugging("proxy"):
            self._tell(decision, picked)
        if isinstance(decision, Pick):
            if decision.delay:
                self._delay = self._clock.callLater(decision.delay, self._pick, decision)
            else:
                return self._pick(decision)
        elif isinstance(decision, Try):
            if picked is not None:
                self.lease = picked
            assert self.lease is not None
            if decision.attempt != self._number:
                self._number = decision.attempt
                self._reporter.attempt_started(self.lease.node, decision.attempt)
            self._watch(self.lease)
            self._try_node(self.lease, decision.fresh)
        elif isinstance(decision, GiveUp):
            self._give_up(decision.error)
        return False

    def _pick(self, pick: Pick) -> bool:
        self._delay = None
        lease = self._pool.acquire(self._route, pick.excluded)
        if lease is None and self._may_queue(pick):
            assert self._queue is not None and self._caller is not None
            self._queued_at = self._clock.seconds()
            self._ticket = self._queue.wait(self._pool, self._route, pick.excluded, self._caller,
                                            self._granted, self._queue_refused)
            return False
        return self._carry_out(self._attempts.picked(lease.node.id if lease is not None else None), lease)

    def _tell(self, decision: Decision, picked: Lease | None) -> None:
        """The DEBUG line of a decision: each retry, each attempt, and giving up."""
        current = self.lease.node.name if self.lease is not None else None
        if isinstance(decision, Pick) and decision.failed is not None:
            log.debug("failing over from {node} after {reason}: another node{delay}, {tried} tried so far",
                      node=current, reason=decision.failed,
                      delay=f" in {decision.delay:g} s" if decision.delay else "", tried=len(decision.excluded))
        elif isinstance(decision, Try):
            lease = picked or self.lease
            log.debug("attempt {attempt} on {node}{how}", attempt=decision.attempt,
                      node=lease.node.name if lease is not None else decision.node_id,
                      how=" on a fresh connection (the kept-alive one was stale)" if decision.fresh else "")
        elif isinstance(decision, GiveUp):
            log.debug("giving up after {count} attempt(s): {status} {code}", count=self.count,
                      status=decision.error.status, code=decision.error.code)

    def _may_queue(self, pick: Pick) -> bool:
        """Whether this pick waits for a slot: the first, with a queue, every candidate at its cap."""
        return (self._queue is not None and self._caller is not None and self._attempts.count == 0
                and self._pool.at_cap(self._route, pick.excluded))

    def _granted(self, lease: Lease) -> None:
        self._ticket = None
        self._reporter.queue_waited(self._queued_at)
        self._carry_out(self._attempts.picked(lease.node.id), lease)

    def _queue_refused(self, err: ProxyError) -> None:
        self._ticket = None
        self._reporter.queue_waited(self._queued_at)
        self._give_up(err)

    def _hold_against_node(self, reason: str) -> None:
        lease = self.lease
        assert lease is not None
        log.info("attempt {attempt} on node {node} failed: {reason}",
                 attempt=self._number, node=lease.node.name, reason=reason)
        if reason == NODE_OUT.reason:
            lease.release()  # the node is out already: its abandoned attempts are no new evidence against it
        else:
            lease.failed(reason)
        self._reporter.attempt_failed(lease.node.name, reason)
