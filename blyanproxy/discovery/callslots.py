"""The workloads API's call slots: known keys first, and first lookups shared fairly among client addresses.

A call for a key the API has already listed (a refresh, or a request whose
list grew too old) is *known* work; a call for a key never listed, or
refused last time, is a *first lookup*, made on behalf of one client
address. ``CallSlots`` runs at most ``size`` calls at once:

- known work goes first: a freed slot takes the oldest known call waiting;
- first lookups never use the last ``reserved`` slots (``reserved_slots``),
  so random keys cannot take every slot from the keys already in use;
- a client address has at most ``per_client`` first lookups queued or in
  progress (``admits``), and queued first lookups take turns by address, so
  one address flooding with random keys cannot hold up another's new key.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure


def reserved_slots(size: int) -> int:
    """The slots first lookups leave to known keys: a quarter, none below four slots."""
    return size // 4


@attrs.define(eq=False)
class _Queued:
    call: Callable[[], defer.Deferred]
    result: defer.Deferred
    client: str | None  # None: known work


class CallSlots:
    """At most ``size`` calls at once, scheduled as the module docstring says."""

    def __init__(self, size: int, per_client: int) -> None:
        self._size = size
        self._first_limit = size - reserved_slots(size)
        self._per_client = per_client
        self._running = 0
        self._running_first = 0
        self._known: deque[_Queued] = deque()
        self._first: OrderedDict[str, deque[_Queued]] = OrderedDict()
        self._first_queued = 0
        self._by_client: Counter[str] = Counter()
        self._pumping = False

    def admits(self, client: str) -> bool:
        """Whether ``client`` may start one more first lookup (fewer than ``per_client`` under way)."""
        return self._by_client[client] < self._per_client

    def queued_first(self) -> int:
        """First lookups waiting for a slot."""
        return self._first_queued

    def run(self, call: Callable[[], defer.Deferred], client: str | None = None) -> defer.Deferred:
        """``call()`` in a slot: known work without ``client``, else a first lookup for ``client``.

        Returns a Deferred of the call's outcome; callers check ``admits``
        first (a first lookup over the limit is still run).
        """
        item = _Queued(call, defer.Deferred(), client)
        if client is None:
            self._known.append(item)
        else:
            self._by_client[client] += 1
            self._first.setdefault(client, deque()).append(item)
            self._first_queued += 1
        self._pump()
        return item.result

    def _next(self) -> _Queued | None:
        if self._running >= self._size:
            return None
        if self._known:
            return self._known.popleft()
        if not self._first or self._running_first >= self._first_limit:
            return None
        client, queue = next(iter(self._first.items()))
        item = queue.popleft()
        if queue:
            self._first.move_to_end(client)  # the next address's turn
        else:
            del self._first[client]
        self._first_queued -= 1
        return item

    def _pump(self) -> None:
        if self._pumping:  # a call that ended at once, inside the loop below: the loop goes on
            return
        self._pumping = True
        try:
            while (item := self._next()) is not None:
                self._start(item)
        finally:
            self._pumping = False

    def _start(self, item: _Queued) -> None:
        self._running += 1
        if item.client is not None:
            self._running_first += 1
        defer.maybeDeferred(item.call).addBoth(self._ended, item)

    def _ended(self, outcome: Any, item: _Queued) -> None:
        self._running -= 1
        if item.client is not None:
            self._running_first -= 1
            self._by_client[item.client] -= 1
            if not self._by_client[item.client]:
                del self._by_client[item.client]
        if isinstance(outcome, Failure):
            item.result.errback(outcome)
        else:
            item.result.callback(outcome)
        self._pump()
