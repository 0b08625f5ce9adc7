"""The pool of one API key's workloads: leases on its nodes, figures shared per node URL.

A ``KeyPool`` is the key's usable nodes as the data path sees them; the
``KeyedBalancer`` behind every key keeps one ``NodeStats`` per node URL, so
a node's whole load (every key's requests) counts when choosing.
"""

from __future__ import annotations

from collections.abc import Sequence

from blyanproxy.core import POLICIES, HealthRules, Node, NodeStats, ProxyError, Route, route_members
from blyanproxy.fleet import Lease, LeaseMaker, LeasePool, check_model


class KeyedBalancer(LeaseMaker):
    """Leases on discovered nodes, with live figures per base URL for every key.

    Nobody probes discovered nodes: an ejected one is let back on trial when
    its cooldown ends (``healthstate.readmit_after_cooldown``).
    """

    def __init__(self, clock, policy: str = "least-inflight", rules: HealthRules = HealthRules(),
                 affinity_load_factor: float = 1.25) -> None:
        super().__init__(clock, rules, affinity_load_factor)
        self._choose = POLICIES[policy]
        self._stats: dict[str, NodeStats] = {}

    def stats(self, node: Node) -> NodeStats:
        """The figures of ``node``'s URL (created on first use)."""
        found = self._stats.get(node.base_url)
        if found is None:
            found = self._stats[node.base_url] = NodeStats()
        return found

    def prune(self, in_use: frozenset[str]) -> None:
        """Forget figures of URLs no cached key lists and nothing is in flight on."""
        for url in [url for url, stats in self._stats.items() if url not in in_use and stats.in_flight == 0]:
            del self._stats[url]

    def acquire(self, nodes: Sequence[Node], route: Route, excluded: frozenset[str]) -> Lease | None:
        """A lease on the node of ``nodes`` chosen for ``route``, or ``None`` when none can take it."""
        try:
            members = route_members(nodes, route)
        except ProxyError:
            return None
        return self.lease_among(members, route, excluded, self.stats, self._choose, unprobed=True)

    def at_cap(self, nodes: Sequence[Node], route: Route, excluded: frozenset[str]) -> bool:
        """Whether the nodes of ``nodes`` that ``route`` may use are all at their cap."""
        try:
            members = route_members(nodes, route)
        except ProxyError:
            return False
        return self.all_at_cap(members, route, excluded, self.stats, unprobed=True)


class KeyPool(LeasePool):
    """One API key's usable nodes (in the API's order), as a pool the data path takes leases from."""

    def __init__(self, nodes: Sequence[Node], balancer: KeyedBalancer) -> None:
        self.nodes = nodes
        self._balancer = balancer

    def check(self, route: Route) -> None:
        """Raise the 404 ``ProxyError`` when ``route`` names no node of this key, or a model none serves."""
        check_model(route_members(self.nodes, route), route, self._balancer.stats)

    def acquire(self, route: Route, excluded: frozenset[str]) -> Lease | None:
        """A lease on the node chosen for ``route``, or ``None`` when none can take it."""
        return self._balancer.acquire(self.nodes, route, excluded)

    def at_cap(self, route: Route, excluded: frozenset[str]) -> bool:
        """Whether this key's nodes that ``route`` may use are all at their cap."""
        return self._balancer.at_cap(self.nodes, route, excluded)

    def listing(self, route: Route) -> list[tuple[Node, NodeStats]]:
        """This key's usable nodes ``route`` may go to, with their figures (shared per node URL)."""
        try:
            members = route_members(self.nodes, route)
        except ProxyError:
            return []
        return self._balancer.usable_among(members, self._balancer.stats)
