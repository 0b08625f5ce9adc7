"""The attempt machine: which node a request tries next, when it fails over, and when it gives up.

One machine serves HTTP forwarding and the WebSocket handshake. It does no
I/O and knows no clock (sans-io): the caller feeds it what happened and
carries out the decision it returns.

==================================== ==================================================
Event                                Decision
==================================== ==================================================
``start()``                          ``Pick``: ask the pool for a node outside ``excluded``
``picked(node_id)``                  ``Try`` that node, or ``GiveUp`` when the pool had none
                                     (``Relay`` when the pool was asked after an answer)
``failed(failure, reused, bytes)``   ``Try`` the same node on a fresh connection (a stale
                                     kept-alive one, once per request), ``Pick`` another
                                     after ``RETRY_DELAY_MS``, or ``GiveUp``
``answered(status)``                 ``Relay`` the answer, or ``Pick`` another node first
                                     (a ``RETRY_ON_STATUS`` status with attempts left)
``unusable(failure)``                ``GiveUp``: the node's answer cannot be passed on
==================================== ==================================================

A decision's ``failed`` is the reason word of the attempt that just ended
badly, to be held against its node (health, metrics, log) before the
decision is carried out; it is None when nothing is held against a node. Each node is tried at
most once per request, and at most ``MAX_ATTEMPTS`` nodes are tried.
"""

from __future__ import annotations

from typing import Union

import attrs

from blyanproxy.core.errors import ProxyError


@attrs.frozen
class AttemptFailure:
    """How one attempt failed: ``reason``, a fixed word for node health and metrics, and ``error``,
    the client's answer should no further attempt be made."""

    reason: str
    error: ProxyError


#: Every way an attempt fails before any byte reached the client.
CONNECT_TIMEOUT = AttemptFailure(
    "connect_timeout", ProxyError(504, "upstream_timeout", "connecting to the node timed out"))
REFUSED = AttemptFailure("refused", ProxyError(502, "upstream_unreachable", "the node refused the connection"))
CONNECT_FAILED = AttemptFailure(
    "connect_failed", ProxyError(502, "upstream_unreachable", "the node could not be reached"))
BAD_RESPONSE = AttemptFailure("bad_response", ProxyError(502, "upstream_failed", "the node's answer is not valid HTTP"))
TLS_FAILED = AttemptFailure("tls_failed", ProxyError(502, "upstream_tls", "the TLS handshake with the node failed"))
NO_RESPONSE = AttemptFailure(
    "no_response", ProxyError(502, "upstream_failed", "the node closed the connection without answering"))
RESPONSE_TIMEOUT = AttemptFailure(
    "response_timeout", ProxyError(504, "upstream_timeout", "the node did not answer in time"))
UPGRADE_TIMEOUT = AttemptFailure(
    "response_timeout", ProxyError(504, "upstream_timeout", "the node did not answer the upgrade in time"))


def bad_handshake(message: str) -> AttemptFailure:
    """A WebSocket handshake answer the proxy cannot read (``message`` says why)."""
    return AttemptFailure("bad_handshake", ProxyError(502, "upstream_failed", message))


def no_node_error(health_interval: float) -> ProxyError:
    """The 503 for a request no node can take; ``Retry-After`` is the next health check, rounded up."""
    return ProxyError(
        503,
        "no_healthy_nodes",
        "no healthy node can take the request",
        retry_after=max(1, int(health_interval + 0.999)),
    )


@attrs.frozen
class AttemptRules:
    """The settings the machine follows: ``MAX_ATTEMPTS``, ``RETRY_DELAY_MS`` (in seconds),
    ``RETRY_ON_STATUS``, and ``HEALTH_INTERVAL_MS`` (in seconds) for the 503's ``Retry-After``."""

    max_attempts: int = 3
    retry_delay: float = 0.0
    retry_on_status: frozenset[int] = frozenset({502, 503, 504})
    health_interval: float = 5.0


@attrs.frozen
class Pick:
    """Ask the pool for a node whose id is not in ``excluded``, after ``delay`` seconds; then ``picked``."""

    excluded: frozenset[str]
    delay: float = 0.0
    failed: str | None = None


#: Every request's first decision (a value: one for all).
_FIRST_PICK = Pick(frozenset())


@attrs.frozen
class Try:
    """Send attempt number ``attempt`` to node ``node_id``; ``fresh``: on a new connection, not a pooled one."""

    node_id: str
    attempt: int
    fresh: bool = False
    failed: str | None = None


@attrs.frozen
class GiveUp:
    """Answer the client ``error``: no further attempt is made."""

    error: ProxyError
    failed: str | None = None


@attrs.frozen
class Relay:
    """Pass the node's answer on to the client."""


Decision = Union[Pick, Try, GiveUp, Relay]


class Attempts:
    """One request's attempts (see the module docstring for the events and decisions)."""

    def __init__(self, rules: AttemptRules) -> None:
        self._rules = rules
        self._tried: list[str] = []
        self._fresh_used = False
        self._last: AttemptFailure | None = None
        self._answer_waiting: str | None = None

    @property
    def count(self) -> int:
        """How many nodes have been tried so far."""
        return len(self._tried)

    def start(self) -> Decision:
        """The request arrived."""
        return _FIRST_PICK

    def picked(self, node_id: str | None) -> Decision:
        """The pool offered ``node_id``, or no node (None)."""
        waiting, self._answer_waiting = self._answer_waiting, None
        if node_id is None:
            if waiting is not None:
                return Relay()
            last = self._last
            return GiveUp(last.error if last is not None else no_node_error(self._rules.health_interval))
        self._tried.append(node_id)
        return Try(node_id, self.count, failed=waiting)

    def failed(self, failure: AttemptFailure, reused: bool = False, bytes_received: int = 0) -> Decision:
        """The current attempt failed before any byte reached the client.

        ``reused`` and ``bytes_received`` describe its connection: a kept-alive
        one that closed before a byte of the answer came is stale, not the
        node's fault, and is replaced by a fresh one to the same node, once.
        """
        if reused and bytes_received == 0 and not self._fresh_used:
            self._fresh_used = True
            return Try(self._tried[-1], self.count, fresh=True)
        self._last = failure
        if self.count >= self._rules.max_attempts:
            return GiveUp(failure.error, failed=failure.reason)
        return Pick(frozenset(self._tried), self._rules.retry_delay, failed=failure.reason)

    def answered(self, status: int) -> Decision:
        """The current attempt's node answered ``status`` (nothing has reached the client yet).

        A ``RETRY_ON_STATUS`` status fails over at once if another node is
        free; when the pool has none, the answer is relayed after all.
        """
        if status in self._rules.retry_on_status and self.count < self._rules.max_attempts:
            self._answer_waiting = f"status_{status}"
            return Pick(frozenset(self._tried))
        return Relay()

    def unusable(self, failure: AttemptFailure) -> Decision:
        """The current attempt's node answered, but its answer cannot be passed on: no failover."""
        self._last = failure
        return GiveUp(failure.error, failed=failure.reason)
