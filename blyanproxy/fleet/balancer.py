"""The forwarding engine's ``pick`` seam: choose a node for a route and account for it.

``Balancer.acquire`` picks a node and counts it in flight in one step, so a
burst of requests sees each other's choices. The returned ``Lease`` is how
the data path reports what happened and gives the node back. ``LeasePool``
is what the data path needs of a pool: the registry's ``Balancer`` and one
API key's ``discovery.KeyPool`` both are one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Protocol, runtime_checkable

import attrs
from twisted.internet.interfaces import IReactorTime

from blyanproxy.core import (
    DOWN,
    POLICIES,
    Candidate,
    HealthRules,
    Node,
    NodeRegistry,
    NodeStats,
    Policy,
    ProxyError,
    Route,
    Turn,
    after_traffic_failure,
    after_traffic_success,
    at_cap,
    cache_aware,
    choose_by_key,
    engine_of,
    fresh,
    model_not_found,
    node_cap,
    readmit_after_cooldown,
    route_allows,
    route_members,
    served_models,
    serving,
    usable,
)
from blyanproxy.logs import debugging, logger

log = logger("balancer")


@attrs.define(eq=False)
class Lease:
    """One attempt's hold on a node: in flight from ``acquire`` until ``release``.

    What the attempt reports feeds the node's passive health.
    """

    node: Node
    stats: NodeStats
    clock: IReactorTime
    rules: HealthRules
    released: bool = False
    on_release: Callable[[], None] | None = None

    @property
    def engine(self) -> str | None:
        """The engine the node runs (declared, else detected; ``None``: not known yet)."""
        return engine_of(self.node.engine, self.stats.engine)

    def failed(self, reason: str) -> None:
        """The attempt failed before any byte reached the client; releases the lease (and, if
        this ejects the node, tells the attempts waiting on it: ``NodeStats.taken_out``)."""
        stats = self.stats
        stats.failures += 1
        stats.consecutive_failures += 1
        stats.last_failure = reason
        before = stats.health
        stats.health = after_traffic_failure(before, reason, self.clock.seconds(), self.rules)
        ejected = False
        if stats.health.ejected_until is not None and stats.health.ejected_until != before.ejected_until:
            ejected = True
            log.warn(
                "node {node} ejected for {seconds:g} s after {reason}",
                node=self.node.name, seconds=stats.health.ejected_until - self.clock.seconds(), reason=reason,
            )
        self.release()
        if ejected:
            stats.taken_out("ejected")  # attempts still waiting on it fail over

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
            if self.on_release is not None:
                self.on_release()


def _served(entry: tuple[Node, NodeStats]) -> tuple[str, ...] | None:
    node, stats = entry
    return served_models(node.models, stats.models)


def check_model(members: Sequence[Node], route: Route, stats_of: Callable[[Node], NodeStats]) -> None:
    """Raise the 404 ``model_not_found`` when the route names a model that no member, usable or
    not, serves or may serve (every member's models are known, and none lists it)."""
    if route.model is not None and members:
        if not serving([(node, stats_of(node)) for node in members], route.model, _served):
            raise model_not_found(route.model)


@runtime_checkable
class LeasePool(Protocol):
    """Where the data path takes leases: the registry's ``Balancer`` or one API key's ``KeyPool``.

    Forwarding calls ``check`` once per request, then ``acquire`` once per
    attempt with the nodes already tried in ``excluded`` (node ids).
    """

    def check(self, route: Route) -> None:
        """Raise the 404 ``ProxyError`` when ``route`` names no node of the pool (a tag or index),
        or a model none of them serves."""

    def acquire(self, route: Route, excluded: frozenset[str]) -> Lease | None:
        """A lease on the node chosen for ``route``, or ``None`` when none can take it."""

    def listing(self, route: Route) -> list[tuple[Node, NodeStats]]:
        """The usable nodes ``route`` may go to, with their live figures (for the model list)."""

    def at_cap(self, route: Route, excluded: frozenset[str]) -> bool:
        """Whether ``acquire`` found no node only because every candidate is at its cap
        (the request may then wait in the queue for a slot)."""


class LeaseMaker:
    """What both pools share: choose one of the usable nodes and count it in flight, in one step.

    A route with an affinity key goes to that key's node
    (``affinity.choose_by_key``), any other to the given policy's choice.
    A node at its cap (``max_inflight``, else ``default_cap``) is no candidate;
    ``on_slot_freed`` is called whenever a lease is given back.
    """

    def __init__(self, clock, rules: HealthRules, affinity_load_factor: float) -> None:
        self._clock = clock
        self._rules = rules
        self._turn = Turn()
        self.affinity_load_factor = affinity_load_factor
        self.default_cap: int | None = None
        self.on_slot_freed: Callable[[], None] | None = None
        #: Seconds between load scrapes (``LOAD_INTERVAL_MS``): figures older than three count as unknown.
        self.load_interval: float = 1.0

    def cap_of(self, node: Node) -> int | None:
        """The number of requests ``node`` may have at once (None: no cap)."""
        return node_cap(node.max_inflight, self.default_cap)

    def candidates(self, usable_nodes: Sequence[tuple[Node, NodeStats]]) -> list[Candidate]:
        """The policies' view of ``usable_nodes``: live counts, and the engine's figures while fresh."""
        now = self._clock.seconds()
        return [Candidate(node, stats.in_flight, stats.latency_ms, fresh(stats.load, now, self.load_interval),
                          stats.dispatched_since_read) for node, stats in usable_nodes]

    def usable_among(self, members: Sequence[Node],
                     stats_of: Callable[[Node], NodeStats]) -> list[tuple[Node, NodeStats]]:
        """The usable ``members`` with their live figures, now."""
        now = self._clock.seconds()
        return [(node, stats) for node in members for stats in (stats_of(node),) if usable(stats.health, now)]

    def lease_among(self, members: Sequence[Node], route: Route, excluded: frozenset[str],
                    stats_of: Callable[[Node], NodeStats], choose: Policy, active_id: str | None = None,
                    unprobed: bool = False) -> Lease | None:
        """A lease on the node chosen among the usable ``members``, or ``None`` when none is.

        ``stats_of`` gives a node's live figures; with ``unprobed`` (nodes no
        health check visits) an ejected node is let back once its cooldown ends.
        A route naming a model chooses among the usable nodes known to serve it,
        else among those whose models are not known yet (``engines.serving``).
        """
        usable_nodes = [(node, stats) for node, stats in self._eligible(members, route, excluded, stats_of, unprobed)
                        if not at_cap(stats.in_flight, self.cap_of(node))]
        if not usable_nodes:
            if debugging("balancer"):
                log.debug("route {path}: no usable node; not usable: {excluded}",
                          path=_path_of(route),
                          excluded=_not_usable(members, excluded, stats_of, self._clock.seconds()))
            return None
        candidates = self.candidates(usable_nodes)
        if route.affinity_key is not None:
            chosen = choose_by_key(route.affinity_key, candidates, self.affinity_load_factor)
        elif choose is cache_aware:
            chosen = cache_aware(candidates, self._turn, active_id, route.prefix_key)
        else:
            chosen = choose(candidates, self._turn, active_id)
        node, stats = usable_nodes[candidates.index(chosen)]
        if debugging("balancer"):
            log.debug("route {path}: {node} chosen by {reason} among {candidates}; not usable: {excluded}",
                      path=_path_of(route), node=node.name, reason=_reason(route, choose),
                      candidates=", ".join(_figures(c) for c in candidates),
                      excluded=_not_usable(members, excluded, stats_of, self._clock.seconds()))
        stats.in_flight += 1
        stats.requests += 1
        return Lease(node=node, stats=stats, clock=self._clock, rules=self._rules, on_release=self.on_slot_freed)

    def _eligible(self, members: Sequence[Node], route: Route, excluded: frozenset[str],
                  stats_of: Callable[[Node], NodeStats], unprobed: bool) -> list[tuple[Node, NodeStats]]:
        """The usable ``members`` outside ``excluded`` that may serve the route's model, caps aside."""
        now = self._clock.seconds()
        usable_nodes = []
        for node in members:
            if node.id not in excluded:
                stats = stats_of(node)
                if unprobed:
                    stats.health = readmit_after_cooldown(stats.health, now)
                if usable(stats.health, now):
                    usable_nodes.append((node, stats))
        if route.model is not None:
            usable_nodes = serving(usable_nodes, route.model, _served)
        return usable_nodes

    def all_at_cap(self, members: Sequence[Node], route: Route, excluded: frozenset[str],
                   stats_of: Callable[[Node], NodeStats], unprobed: bool = False) -> bool:
        """Whether some of ``members`` could take ``route`` but every one of them is at its cap."""
        eligible = self._eligible(members, route, excluded, stats_of, unprobed)
        return bool(eligible) and all(at_cap(stats.in_flight, self.cap_of(node)) for node, stats in eligible)


def _path_of(route: Route) -> str:
    """The path a route sends upstream, without its query (which may hold secrets), for DEBUG lines."""
    return route.upstream_target.partition(b"?")[0].decode("latin-1")


def _reason(route: Route, choose: Policy) -> str:
    """What chose the node, for DEBUG lines: the affinity key, or the policy by its name."""
    if route.affinity_key is not None:
        return "affinity key (rendezvous hash)"
    name = next((name for name, policy in POLICIES.items() if policy is choose), getattr(choose, "__name__", "?"))
    return f"policy {name}"


def _figures(candidate: Candidate) -> str:
    """A candidate and the figures policies read, for DEBUG lines."""
    latency = "no latency yet" if candidate.latency_ms is None else f"{candidate.latency_ms:.1f} ms"
    return f"{candidate.node.name} ({candidate.in_flight} in flight, {latency}, weight {candidate.node.weight})"


def _not_usable(members: Sequence[Node], excluded: frozenset[str], stats_of: Callable[[Node], NodeStats],
                now: float) -> str:
    """The members a request may not go to, each with why, for DEBUG lines."""
    reasons = []
    for node in members:
        health = stats_of(node).health
        if node.id in excluded:
            reasons.append(f"{node.name} (tried)")
        elif health.state == DOWN:
            reasons.append(f"{node.name} (down)")
        elif health.ejected_until is not None and now < health.ejected_until:
            reasons.append(f"{node.name} (ejected for {health.ejected_until - now:.1f} s after {health.eject_reason})")
        elif health.probe_needed:
            reasons.append(f"{node.name} (ejected, waiting for a passing probe)")
    return ", ".join(reasons) or "none"


class Balancer(LeaseMaker, LeasePool):
    """Hands out leases on the registry's usable nodes, chosen by the current selection policy.

    Usable: not draining, not excluded for this request, not known to be down
    and not ejected (``healthstate.usable``), and the node a route names, if it
    names one (``?api=``); a tag or index route narrows the choice first
    (``selection.route_members``, over the nodes not draining).
    ``policy`` (a name from ``selection.POLICIES``) may change at run time.
    """

    def __init__(self, registry: NodeRegistry, clock, policy: str = "active-first",
                 rules: HealthRules = HealthRules(), affinity_load_factor: float = 1.25) -> None:
        super().__init__(clock, rules, affinity_load_factor)
        self._registry = registry
        self.policy = policy

    @property
    def policy(self) -> str:
        """The name of the selection policy in use."""
        return self._policy_name

    @policy.setter
    def policy(self, name: str) -> None:
        self._choose = POLICIES[name]
        self._policy_name = name

    def _members(self, route: Route) -> Sequence[Node]:
        nodes = [node for node in self._registry.nodes() if not node.draining and route_allows(route, node)]
        if route.tag is None and route.index is None:
            return nodes
        return route_members(nodes, route)

    def is_empty(self) -> bool:
        """Whether the registry has no node at all."""
        return not self._registry.nodes()

    def check(self, route: Route) -> None:
        """Raise the 404 ``ProxyError`` when a tag or index route names no registry node, or
        names a model none of them serves."""
        if route.tag is not None or route.index is not None or route.model is not None:
            registry = self._registry
            if route.index is None:  # a draining node still serves its model: 503 while it drains, not 404
                members = route_members([node for node in registry.nodes() if route_allows(route, node)], route)
            else:
                members = self._members(route)
            check_model(members, route, lambda node: registry.stats(node.id))

    def serves(self, route: Route) -> bool:
        """Whether some registered node, usable or not, may take ``route`` (``?api=`` names one)."""
        return route.node is None or any(route_allows(route, node) for node in self._registry.nodes())

    def listing(self, route: Route) -> list[tuple[Node, NodeStats]]:
        """The usable registry nodes ``route`` may go to (none when a tag or index names none)."""
        registry = self._registry
        try:
            members = self._members(route)
        except ProxyError:
            return []
        return self.usable_among(members, lambda node: registry.stats(node.id))

    def at_cap(self, route: Route, excluded: frozenset[str]) -> bool:
        """Whether the registry nodes ``route`` may use are all at their cap."""
        registry = self._registry
        try:
            members = self._members(route)
        except ProxyError:
            return False
        return self.all_at_cap(members, route, excluded, lambda node: registry.stats(node.id))

    def acquire(self, route: Route, excluded: frozenset[str]) -> Lease | None:
        """A lease on the node chosen for ``route``, or ``None`` when no node can take it."""
        registry = self._registry
        try:
            members = self._members(route)
        except ProxyError:
            return None
        return self.lease_among(members, route, excluded, lambda node: registry.stats(node.id), self._choose,
                                registry.active_id)
