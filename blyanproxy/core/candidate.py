"""``Candidate``: a usable node as a selection policy sees it (its own module: the affinity
choice and the policies both read it)."""

from __future__ import annotations

import attrs

from blyanproxy.core.loadfigures import LoadFigures
from blyanproxy.core.nodes import Node


@attrs.frozen
class Candidate:
    """A usable node as a policy sees it: this process's in-flight count and latency average, the
    engine's own figures while fresh (``None``: unknown), and this process's dispatches to it since
    those figures were read, less those that ended since (``NodeStats.dispatched_since_read``)."""

    node: Node
    in_flight: int = 0
    latency_ms: float | None = None
    load: LoadFigures | None = None
    dispatched: int = 0
