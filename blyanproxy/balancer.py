"""The forwarding engine's ``pick`` seam: choose a node for a route and account for it.

``Balancer.acquire`` picks a node and counts it in flight in one step, so a
burst of requests sees each other's choices. The returned ``Lease`` is how
the data path reports what happened and gives the node back.
"""

from __future__ import annotations

from typing import FrozenSet, Optional

import attrs

from .affinity import choose_by_key
from .healthstate import (
    HealthRules,
    after_traffic_failure,
    after_traffic_success,
    usable,
)
from .logs import logger
from .nodes import Node, NodeRegistry, NodeStats
from .routing import Route, route_allows
from .selection import POLICIES, Candidate, Turn

log = logger("balancer")

@attrs.define(eq=False)
class Lease:
    """One attempt's hold on a node: in flight from ``acquire`` until ``release``.

    What the attempt reports feeds the node's passive health.
    """

    node: Node
    stats: NodeStats
    clock: object
    rules: HealthRules
    released: bool = False

    def failed(self, reason: str) -> None:
        """The attempt failed before any byte reached the client; releases the lease."""
        stats = self.stats
        stats.failures += 1
        stats.consecutive_failures += 1
        stats.last_failure = reason
        before = stats.health
        stats.health = after_traffic_failure(before, reason, self.clock.seconds(), self.rules)
        if stats.health.ejected_until != before.ejected_until:
            log.warn(
                "node {node} ejected for {seconds:g} s after {reason}",
                node=self.node.name, seconds=stats.health.ejected_until - self.clock.seconds(), reason=reason,
            )
        self.release()

    def responded(self, seconds_to_first_byte: float) -> None:
        """The node answered with a response the client will get, after this long."""
        self.stats.consecutive_failures = 0
        self.stats.health = after_traffic_success(self.stats.health)
        self.stats.observe_latency(seconds_to_first_byte * 1000.0)

    def release(self) -> None:
        """The request on this node is over (idempotent)."""
        if not self.released:
            self.released = True
            self.stats.in_flight -= 1


class Balancer:
    """Hands out leases on usable nodes, chosen by the current selection policy.

    Usable: not draining, not excluded for this request, not known to be down
    and not ejected (``healthstate.usable``), and the node a route names, if it
    names one (``?api=``). A route with an affinity key goes
    to that key's node (``affinity.choose_by_key``) instead of the policy's.
    ``policy`` (a name from ``selection.POLICIES``) may change at run time.
    """

    def __init__(self, registry: NodeRegistry, clock, policy: str = "active-first",
                 rules: HealthRules = HealthRules(), affinity_load_factor: float = 1.25) -> None:
        self._registry = registry
        self._clock = clock
        self._rules = rules
        self._turn = Turn()
        self.policy = policy
        self.affinity_load_factor = affinity_load_factor

    @property
    def policy(self) -> str:
        """The name of the selection policy in use."""
        return self._policy_name

    @policy.setter
    def policy(self, name: str) -> None:
        self._choose = POLICIES[name]
        self._policy_name = name

    def serves(self, route: Route) -> bool:
        """Whether some registered node, usable or not, may take ``route`` (``?api=`` names one)."""
        return route.node is None or any(route_allows(route, node) for node in self._registry.nodes())

    def acquire(self, route: Route, excluded: FrozenSet[str]) -> Optional[Lease]:
        """A lease on the node chosen for ``route``, or ``None`` when no node can take it."""
        registry = self._registry
        now = self._clock.seconds()
        candidates = []
        for node in registry.nodes():
            if node.id in excluded or node.draining or not route_allows(route, node):
                continue
            stats = registry.stats(node.id)
            if usable(stats.health, now):
                candidates.append(Candidate(node, stats.in_flight, stats.latency_ms))
        if not candidates:
            return None
        if route.affinity_key is not None:
            node = choose_by_key(route.affinity_key, candidates, self.affinity_load_factor).node
        else:
            node = self._choose(candidates, self._turn, registry.active_id).node
        stats = registry.stats(node.id)
        stats.in_flight += 1
        stats.requests += 1
        return Lease(node=node, stats=stats, clock=self._clock, rules=self._rules)
