"""Selection policies: pure choices of one node among usable candidates.

Each policy takes the candidates in registry order (already filtered to the
usable, not excluded ones, never empty) and a ``Turn`` (the little state a
fair policy carries between calls), and returns one candidate. Nothing here
does I/O or reads a clock.

- ``active-first``: the active node if it is a candidate, else the first one.
- ``round-robin``: smooth weighted round-robin (as nginx does it), so a node of
  weight 3 gets three picks in every cycle of ``sum(weights)``, spread out.
- ``least-latency``: the lowest moving-average latency; a node with no figure
  yet is tried first, so it gets one.
- ``least-inflight``: the fewest requests in flight; ties rotate, so equal
  nodes share load evenly instead of the first one taking every tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import attrs

from blyanproxy.core.errors import ProxyError
from blyanproxy.core.nodes import Node
from blyanproxy.core.routing import ALL_TAG, Route


def route_members(nodes: Sequence[Node], route: Route) -> Sequence[Node]:
    """The nodes a tag or index route may use, in pool order; ``ProxyError`` (404) when it names none.

    ``nodes`` are the pool's usable nodes in order (the index counts them);
    a route with neither tag nor index (or the tag ``all``) may use them all.
    """
    if route.index is not None:
        if not nodes:
            raise ProxyError(404, "no_workloads", "No running workloads found")
        if route.index >= len(nodes):
            raise ProxyError(404, "index_out_of_range",
                             f"Workload index {route.index} out of range (0-{len(nodes) - 1})")
        return nodes[route.index:route.index + 1]
    if route.tag is not None and route.tag != ALL_TAG:
        members = [node for node in nodes if route.tag in node.tags]
        if not members:
            raise ProxyError(404, "unknown_tag", "no nodes found for tag: " + route.tag[:100])
        return members
    return nodes


@attrs.frozen
class Candidate:
    """A usable node as a policy sees it."""

    node: Node
    in_flight: int = 0
    latency_ms: float | None = None


@attrs.define
class Turn:
    """What fair policies remember between picks: a rotation counter and smooth-RR weights."""

    counter: int = 0
    current_weights: dict[str, int] = attrs.Factory(dict)


def _rotate_among(tied: Sequence[Candidate], turn: Turn) -> Candidate:
    chosen = tied[turn.counter % len(tied)]
    turn.counter += 1
    return chosen


def active_first(candidates: Sequence[Candidate], turn: Turn, active_id: str | None) -> Candidate:
    """The active node when it can take the request, else the first candidate."""
    for candidate in candidates:
        if candidate.node.id == active_id:
            return candidate
    return candidates[0]


def round_robin(candidates: Sequence[Candidate], turn: Turn, active_id: str | None) -> Candidate:
    """Smooth weighted round-robin: add each weight to its node's score, take the highest,
    subtract the total from it. Nodes that left the candidates lose their score."""
    weights = turn.current_weights
    present = {c.node.id for c in candidates}
    for node_id in [n for n in weights if n not in present]:
        del weights[node_id]
    total = 0
    best = candidates[0]
    for candidate in candidates:
        node = candidate.node
        weights[node.id] = weights.get(node.id, 0) + node.weight
        total += node.weight
        if weights[node.id] > weights[best.node.id]:
            best = candidate
    weights[best.node.id] -= total
    return best


def least_latency(candidates: Sequence[Candidate], turn: Turn, active_id: str | None) -> Candidate:
    """The lowest latency; unmeasured nodes first; ties rotate."""
    measured = {id(c): c.latency_ms for c in candidates if c.latency_ms is not None}
    if len(measured) < len(candidates):
        return _rotate_among([c for c in candidates if c.latency_ms is None], turn)
    lowest = min(measured.values())
    return _rotate_among([c for c in candidates if c.latency_ms == lowest], turn)


def least_inflight(candidates: Sequence[Candidate], turn: Turn, active_id: str | None) -> Candidate:
    """The fewest requests in flight; ties rotate."""
    fewest = min(c.in_flight for c in candidates)
    return _rotate_among([c for c in candidates if c.in_flight == fewest], turn)


Policy = Callable[[Sequence[Candidate], Turn, Optional[str]], Candidate]

POLICIES: dict[str, Policy] = {
    "active-first": active_first,
    "round-robin": round_robin,
    "least-latency": least_latency,
    "least-inflight": least_inflight,
}
