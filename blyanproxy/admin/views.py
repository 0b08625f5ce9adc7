"""JSON views of the fleet for the admin API and the public status endpoints."""

from __future__ import annotations

import typing

from blyanproxy.core import UP, Node, NodeRegistry, NodeStats, node_to_json, served_models, usable


class RequestTotals(typing.Protocol):
    """The request counters the status views show (the forwarder's ``RequestCounters``)."""

    @property
    def requests(self) -> int: ...

    @property
    def failures(self) -> int: ...


def node_view(node: Node, stats: NodeStats, now: float) -> dict:
    """A node with its live figures (Blyan's field names where Blyan had them)."""
    health = stats.health
    view = node_to_json(node)
    view.update(
        healthy=health.state == UP,
        usable=usable(health, now) and not node.draining,
        state=health.state,
        lastCheck=health.last_check,
        lastError=health.last_error,
        responseTime=stats.latency_ms,
        consecutiveFailures=stats.consecutive_failures,
        inFlight=stats.in_flight,
        requests=stats.requests,
        failures=stats.failures,
        ejectedUntil=health.ejected_until if health.ejected_until and health.ejected_until > now else None,
        ejectReason=health.eject_reason,
        ejections=health.ejections,
    )
    view.update(engine_view(node, stats))
    view.update(load_view(stats, now))
    return view


def load_view(stats: NodeStats, now: float) -> dict:
    """The engine's own load figures as last read (``None`` where it does not say, or never read),
    their age in seconds, and this process's dispatches to the node since, less those ended."""
    load = stats.load
    if load is None:
        return {"load": None}
    return {"load": {"waiting": load.waiting, "running": load.running, "kvCacheUse": load.kv_use,
                     "ageSeconds": round(now - load.at, 3), "dispatchedSince": stats.dispatched_since_read}}


def engine_view(node: Node, stats: NodeStats) -> dict:
    """What is known of a node's engine: the kind detected and the models it serves (``None``: not known)."""
    served = served_models(node.models, stats.models)
    return {"detectedEngine": stats.engine, "servedModels": list(served) if served is not None else None}


def nodes_view(registry: NodeRegistry, now: float) -> list:
    """Every node, in registry order."""
    return [node_view(node, registry.stats(node.id), now) for node in registry.nodes()]


def active_index(registry: NodeRegistry) -> int | None:
    """The active node's place in registry order (Blyan's ``activeIndex``), or None."""
    for index, node in enumerate(registry.nodes()):
        if node.id == registry.active_id:
            return index
    return None


def usable_count(registry: NodeRegistry, now: float) -> int:
    """How many nodes can take a request now."""
    return sum(
        1 for node in registry.nodes() if not node.draining and usable(registry.stats(node.id).health, now)
    )
