"""The forwarding engine's ``pick`` seam: choose a node for a route and account for it.

``Balancer.acquire`` picks a node and counts it in flight in one step, so a
burst of requests sees each other's choices. The returned ``Lease`` is how
the data path reports what happened and gives the node back.
"""

from __future__ import annotations

from typing import Callable, FrozenSet, List, Optional

import attrs

from .nodes import Node, NodeRegistry, NodeStats
from .routing import Route

#: A policy: the node to use among usable candidates (never empty), or None.
Chooser = Callable[[List[Node], Route], Optional[Node]]


@attrs.define(eq=False)
class Lease:
    """One attempt's hold on a node: in flight from ``acquire`` until ``release``."""

    node: Node
    stats: NodeStats
    released: bool = False

    def failed(self, reason: str) -> None:
        """The attempt failed before any byte reached the client; releases the lease."""
        self.stats.failures += 1
        self.stats.consecutive_failures += 1
        self.stats.last_failure = reason
        self.release()

    def responded(self) -> None:
        """The node answered with a response the client will get."""
        self.stats.consecutive_failures = 0

    def release(self) -> None:
        """The request on this node is over (idempotent)."""
        if not self.released:
            self.released = True
            self.stats.in_flight -= 1


def rotating_chooser() -> Chooser:
    """Plain rotation over the candidates: each call takes the next one."""
    turn = [0]

    def choose(candidates: List[Node], route: Route) -> Optional[Node]:
        node = candidates[turn[0] % len(candidates)]
        turn[0] += 1
        return node

    return choose


class Balancer:
    """Hands out leases on registry nodes that are not draining and not excluded."""

    def __init__(self, registry: NodeRegistry, choose: Chooser) -> None:
        self._registry = registry
        self._choose = choose

    def acquire(self, route: Route, excluded: FrozenSet[str]) -> Optional[Lease]:
        """A lease on the node chosen for ``route``, or ``None`` when no node can take it."""
        candidates = [
            node
            for node in self._registry.nodes()
            if node.id not in excluded and not node.draining
        ]
        if not candidates:
            return None
        node = self._choose(candidates, route)
        if node is None:
            return None
        stats = self._registry.stats(node.id)
        stats.in_flight += 1
        stats.requests += 1
        return Lease(node=node, stats=stats)
