"""JSON views of the fleet for the admin API and the public status endpoints.

Times in these views are epoch milliseconds, as Blyan had them (``lastCheck``,
``ejectedUntil``, ``addedAt``); durations are milliseconds (``responseTime``).
A node that failed traffic and was ejected (``blyan_node_ejected`` 1 in
``/metrics``) shows ``state: "ejected"``, ``ejected: true`` and
``healthy: false`` until a passing probe after its cooldown lets it back.
"""

from __future__ import annotations

import typing

from blyanproxy.core import DOWN, UP, Node, NodeRegistry, NodeStats, node_to_json, served_models, usable

#: The ``state`` of a node held out by a passive ejection (its health checks may pass meanwhile).
EJECTED = "ejected"


class RequestTotals(typing.Protocol):
    """The request counters the status views show (the forwarder's ``RequestCounters``)."""

    @property
    def requests(self) -> int: ...

    @property
    def failures(self) -> int: ...


def epoch_ms(seconds: float | None) -> int | None:
    """An epoch time in seconds (the reactor's clock) as whole epoch milliseconds."""
    return None if seconds is None else round(seconds * 1000)


def shown_state(stats: NodeStats) -> str:
    """The state a view shows: ``ejected`` while an ejection holds the node out (as ``blyan_node_ejected``
    counts it), else what the health checks say (``up``, ``down``, ``unknown``); ``down`` wins."""
    health = stats.health
    if health.probe_needed and health.state != DOWN:
        return EJECTED
    return health.state


def node_view(node: Node, stats: NodeStats, now: float) -> dict:
    """A node with its live figures (Blyan's field names where Blyan had them; times in epoch ms)."""
    health = stats.health
    state = shown_state(stats)
    view = node_to_json(node)
    view.update(
        addedAt=epoch_ms(node.added_at),
        healthy=state == UP,
        usable=usable(health, now) and not node.draining,
        state=state,
        ejected=health.probe_needed,
        lastCheck=epoch_ms(health.last_check),
        lastError=health.last_error,
        responseTime=stats.latency_ms,
        consecutiveFailures=stats.consecutive_failures,
        inFlight=stats.in_flight,
        requests=stats.requests,
        failures=stats.failures,
        ejectedUntil=epoch_ms(health.ejected_until) if health.ejected_until and health.ejected_until > now else None,
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


class AdmissionView(typing.Protocol):
    """What the admin API shows of admission (the data path's ``Admission``)."""

    def view(self) -> dict:
        """The queue, the rate limits and each caller's totals, keys by their hash only."""


def with_slots(nodes: list[dict], registry: NodeRegistry, cap_of: typing.Callable[[Node], int | None]) -> None:
    """Add each capped node's ``slots`` (in use and cap) and its ``queue`` text for the status page."""
    for view in nodes:
        node = registry.get(view["id"])
        cap = cap_of(node) if node is not None else None
        if cap is not None:
            view["slots"] = {"inUse": view["inFlight"], "cap": cap}
            view["queue"] = f"{view['inFlight']}/{cap} slots in use"
