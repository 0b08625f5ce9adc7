"""Admission: per-node concurrency caps and the bounded fair queue of requests waiting for a slot.

A node at its cap (``max_inflight``, else ``NODE_MAX_INFLIGHT``) is not a
candidate (``at_cap``). When every candidate of a request is at its cap the
request waits in a ``FairQueue``; each slot freed is offered to the waiting
requests in ``FairQueue.in_order``: the best band first (``X-Priority``:
high, normal, low), where a request climbs one band for every ``aging``
seconds it has waited (no band starves); within a band, round-robin between
caller keys (the key served longest ago first), FIFO within one key.
``SlotRate`` estimates how soon slots free up, for ``Retry-After``. No clock
here: the caller passes ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, TypeVar

import attrs

from blyanproxy.core.errors import ProxyError

#: The priority bands, best first, as ``X-Priority`` names them.
BANDS = ("high", "normal", "low")
DEFAULT_BAND = "normal"


def parse_priority(value: bytes | None) -> str:
    """The band an ``X-Priority`` header value names (``normal`` when absent or unknown)."""
    if value is None:
        return DEFAULT_BAND
    word = value.strip().lower().decode("ascii", "replace")
    return word if word in BANDS else DEFAULT_BAND


def node_cap(max_inflight: int | None, default: int | None) -> int | None:
    """The cap that holds for a node: its own ``max_inflight``, else the default (None: no cap)."""
    return max_inflight if max_inflight is not None else default


def at_cap(in_flight: int, cap: int | None) -> bool:
    """Whether a node with ``in_flight`` requests may take no more (it is then not a candidate)."""
    return cap is not None and in_flight >= cap


T = TypeVar("T")


@attrs.define(eq=False)
class Waiter(Generic[T]):
    """One request in the queue: its caller ``key``, ``band``, when it came, and what it carries."""

    key: str
    band: str
    since: float
    item: T
    seq: int = 0


class FairQueue(Generic[T]):
    """The bounded fair queue (see the module docstring); holds at most ``limit`` waiters."""

    def __init__(self, limit: int, aging: float = 2.0) -> None:
        self.limit = limit
        self.aging = aging
        self._by_key: dict[str, deque[Waiter[T]]] = {}
        self._turn: dict[str, int] = {}  # per key: the sequence number it was last served (or came) at
        self._seq = 0

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self._by_key.values())

    def depth_by_band(self) -> dict[str, int]:
        """How many wait in each band."""
        depth = dict.fromkeys(BANDS, 0)
        for waiters in self._by_key.values():
            for waiter in waiters:
                depth[waiter.band] += 1
        return depth

    def push(self, key: str, band: str, now: float, item: T) -> Waiter[T] | None:
        """Queue ``item``; None when the queue is full."""
        if len(self) >= self.limit:
            return None
        self._seq += 1
        waiter = Waiter(key, band, now, item, self._seq)
        if key not in self._by_key:
            self._by_key[key] = deque()
            self._turn[key] = self._seq
        self._by_key[key].append(waiter)
        return waiter

    def remove(self, waiter: Waiter[T]) -> None:
        """Take ``waiter`` out (it left, timed out, or was served); no-op when it is not queued."""
        waiters = self._by_key.get(waiter.key)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        if not waiters:
            del self._by_key[waiter.key]
            del self._turn[waiter.key]

    def served(self, waiter: Waiter[T]) -> None:
        """``waiter`` got its slot: it leaves, and its key goes to the back of the round."""
        self.remove(waiter)
        self._seq += 1
        if waiter.key in self._turn:
            self._turn[waiter.key] = self._seq

    def rank(self, waiter: Waiter[T], now: float) -> int:
        """The band ``waiter`` competes in now: its own, raised one for each ``aging`` seconds waited."""
        climbed = int((now - waiter.since) / self.aging) if self.aging > 0 else 0
        return max(0, BANDS.index(waiter.band) - climbed)

    def in_order(self, now: float) -> list[Waiter[T]]:
        """Every waiter, in the order a freed slot is offered to them."""
        entries = []
        for key, waiters in self._by_key.items():
            turn = self._turn[key]
            for depth, waiter in enumerate(waiters):
                entries.append(((self.rank(waiter, now), depth, turn, waiter.seq), waiter))
        entries.sort(key=lambda entry: entry[0])
        return [waiter for _, waiter in entries]

    def waiters(self) -> list[Waiter[T]]:
        """Every waiter, in no particular order."""
        return [waiter for waiters in self._by_key.values() for waiter in waiters]


class SlotRate:
    """How fast slots free up, from the times of the last ``window`` releases."""

    def __init__(self, window: int = 64) -> None:
        self._times: deque[float] = deque(maxlen=window)

    def freed(self, now: float) -> None:
        """A slot was freed at ``now``."""
        self._times.append(now)

    def per_second(self, now: float) -> float | None:
        """Slots freed per second lately (None: too few seen to tell)."""
        times = self._times
        if len(times) < 2:
            return None
        span = max(now, times[-1]) - times[0]
        return (len(times) - 1) / span if span > 0 else None

    def retry_after(self, ahead: int, now: float, fallback: int = 1, most: int = 60) -> int:
        """Whole seconds until ``ahead`` more slots are likely to free (at least 1, at most ``most``)."""
        rate = self.per_second(now)
        if rate is None:
            return max(1, min(most, fallback))
        return max(1, min(most, math.ceil((ahead + 1) / rate)))


def queue_full_error(retry_after: int) -> ProxyError:
    """The 429 for a request that finds the queue full."""
    return ProxyError(429, "queue_full", "every node is at its cap and the queue is full", retry_after=retry_after)


def queue_timeout_error(retry_after: int) -> ProxyError:
    """The 503 for a request that waited ``QUEUE_TIMEOUT_MS`` without a slot."""
    return ProxyError(503, "queue_timeout", "no node slot freed in time", retry_after=retry_after)


def queue_closed_error() -> ProxyError:
    """The 503 for a request still queued when the proxy shuts down."""
    return ProxyError(503, "shutting_down", "the proxy is shutting down", retry_after=1)
