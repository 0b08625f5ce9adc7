"""The forwarding engine's ``pick`` seam: choose a node for a route and account for it.

``Balancer.acquire`` picks a node and counts it in flight in one step, so a
burst of requests sees each other's choices. The returned ``Lease`` is how
the data path reports what happened and gives the node back.
"""

from __future__ import annotations

from typing import FrozenSet, Optional

import attrs

from .nodes import Node, NodeRegistry, NodeStats
from .routing import Route
from .selection import POLICIES, Candidate, Turn

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

    def responded(self, seconds_to_first_byte: float) -> None:
        """The node answered with a response the client will get, after this long."""
        self.stats.consecutive_failures = 0
        self.stats.observe_latency(seconds_to_first_byte * 1000.0)

    def release(self) -> None:
        """The request on this node is over (idempotent)."""
        if not self.released:
            self.released = True
            self.stats.in_flight -= 1


class Balancer:
    """Hands out leases on usable nodes, chosen by the current selection policy.

    Usable, for now: not draining and not excluded for this request.
    ``policy`` (a name from ``selection.POLICIES``) may change at run time.
    """

    def __init__(self, registry: NodeRegistry, policy: str = "active-first") -> None:
        self._registry = registry
        self._turn = Turn()
        self.policy = policy

    @property
    def policy(self) -> str:
        """The name of the selection policy in use."""
        return self._policy_name

    @policy.setter
    def policy(self, name: str) -> None:
        self._choose = POLICIES[name]
        self._policy_name = name

    def acquire(self, route: Route, excluded: FrozenSet[str]) -> Optional[Lease]:
        """A lease on the node chosen for ``route``, or ``None`` when no node can take it."""
        registry = self._registry
        candidates = []
        for node in registry.nodes():
            if node.id in excluded or node.draining:
                continue
            stats = registry.stats(node.id)
            candidates.append(Candidate(node, stats.in_flight, stats.latency_ms))
        if not candidates:
            return None
        node = self._choose(candidates, self._turn, registry.active_id).node
        stats = registry.stats(node.id)
        stats.in_flight += 1
        stats.requests += 1
        return Lease(node=node, stats=stats)
