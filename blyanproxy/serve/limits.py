"""What clients may hold of the proxy at once: request-body bytes, and connections per address.

Plain counters, kept by the ``ProxySite`` and consulted by its requests and
channels (``serve.site``): no I/O, no clock.
"""

from __future__ import annotations

from collections import Counter

from blyanproxy.core import ForwardTrust


class BodyBudget:
    """The bytes of request bodies held at once, across every request, up to ``limit``.

    A request takes its declared length when its head arrives, or a chunked
    body's bytes as they arrive, and gives them back when it ends.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, count: int) -> bool:
        """Count ``count`` more bytes as held; False (nothing counted) when that passes the limit."""
        if self.held + count > self.limit:
            return False
        self.held += count
        return True

    def give_back(self, count: int) -> None:
        """``count`` bytes taken earlier are no longer held."""
        self.held -= count


class ConnectionCounts:
    """Open connections per client address, at most ``limit`` each (0: no limit).

    Peers that ``unlimited`` trusts (``TRUST_FORWARDED``: a proxy in front,
    carrying many clients on its connections) are not counted.
    """

    def __init__(self, limit: int, unlimited: ForwardTrust) -> None:
        self._limit = limit
        self._unlimited = unlimited
        self._open: Counter[str] = Counter()

    def admit(self, address: str) -> bool:
        """A connection from ``address`` opened: True (and counted) if it may stay."""
        if not self._limit or self._unlimited.trusts(address):
            return True
        if self._open[address] >= self._limit:
            return False
        self._open[address] += 1
        return True

    def open_from(self, address: str) -> int:
        """How many counted connections ``address`` has open."""
        return self._open[address]

    def closed(self, address: str) -> None:
        """An admitted connection from ``address`` closed."""
        if not self._limit or self._unlimited.trusts(address):
            return
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]
