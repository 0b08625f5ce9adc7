"""The garbage collector tuned for a process that holds thousands of connections open.

CPython collects its youngest objects every 700 allocations net, and the
older ones every tenth and hundredth of those. Each connection, request and
stream holds many long-lived objects, so with thousands open the older
collections walk all of them, again and again: during a burst of 8,000 new
streams they took about a third of the proxy's core. Nearly all of a
request's objects die by reference counting anyway. ``tune_garbage_collector``
runs the collector at larger intervals (``THRESHOLDS``) and freezes what
start-up built (modules, settings, the fleet) out of its reach. That is
safe because a request leaves no cycles behind (``forward.Exchange`` cuts
its own when it ends): what little cyclic garbage there is waits longer.
"""

from __future__ import annotations

import gc
from typing import Protocol

#: Allocations (net) between young collections; young, then middle, collections between older ones.
THRESHOLDS = (100_000, 50, 100)


class Collector(Protocol):
    """The part of the ``gc`` module used here."""

    def set_threshold(self, threshold0: int, threshold1: int = ..., threshold2: int = ..., /) -> None:
        """Set the collection thresholds."""

    def freeze(self) -> None:
        """Move every object tracked now to the permanent generation."""


def tune_garbage_collector(collector: Collector = gc) -> None:
    """Collect at ``THRESHOLDS`` and freeze what exists now (call it once start-up is done)."""
    collector.set_threshold(*THRESHOLDS)
    collector.freeze()
