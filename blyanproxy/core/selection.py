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
- ``least-load``: the lowest ``load_rank``: the engine's own queue, then its
  running requests plus this process's dispatches since the figures were read
  (less those that ended since),
  then its KV-cache use; a node without fresh figures ranks as
  ``(0, in flight, 0)``. Ties rotate.
- ``cache-aware``: requests whose prompts share a leading part (``Route.prefix_key``)
  go to one node, chosen by bounded-load rendezvous hashing
  (``affinity.choose_by_key``); while that node's load exceeds the least loaded
  one's by more than ``BALANCE_ABS`` requests and ``BALANCE_REL`` times, or for a
  request with no prompt, ``least-load`` chooses. Deterministic: every process and
  host sends a prefix to the same node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import attrs

from blyanproxy.core.affinity import choose_by_key
from blyanproxy.core.candidate import Candidate
from blyanproxy.core.errors import ProxyError
from blyanproxy.core.nodes import Node
from blyanproxy.core.routing import ALL_TAG, Route

__all__ = ["Candidate"]


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


def load_rank(candidate: Candidate) -> tuple[float, float, float]:
    """How loaded a node is, lowest first: ``(waiting, running + dispatched, kv use)`` from its
    fresh engine figures (running never below this process's in-flight requests not waiting),
    or ``(0, in flight, 0)`` without them."""
    load = candidate.load
    if load is None:
        return (0.0, float(candidate.in_flight), 0.0)
    waiting = load.waiting or 0.0
    running = load.running if load.running is not None else float(candidate.in_flight)
    # the engine holds at least this process's requests in flight (running or waiting)
    return (waiting, max(running + candidate.dispatched, candidate.in_flight - waiting, 0.0), load.kv_use or 0.0)


def load_total(candidate: Candidate) -> float:
    """One number for a node's load: waiting plus running (``load_rank``'s first two)."""
    waiting, running, _ = load_rank(candidate)
    return waiting + running


def least_load(candidates: Sequence[Candidate], turn: Turn, active_id: str | None) -> Candidate:
    """The lowest ``load_rank``; ties rotate."""
    lowest = min(load_rank(c) for c in candidates)
    return _rotate_among([c for c in candidates if load_rank(c) == lowest], turn)


#: The key's node is passed over for ``least-load`` while its load exceeds the least loaded
#: node's by more than this many requests…
BALANCE_ABS = 2.0
#: …and by more than this factor (sglang-router's ``--balance-abs-threshold`` and ``-rel-``).
BALANCE_REL = 1.5
#: The load bound of the rendezvous choice (as ``AFFINITY_LOAD_FACTOR``).
PREFIX_LOAD_FACTOR = 1.25


def cache_aware(candidates: Sequence[Candidate], turn: Turn, active_id: str | None,
                prefix_key: bytes | None = None) -> Candidate:
    """The prefix key's node unless it is overloaded (see the module docstring), else ``least-load``."""
    if prefix_key is None:
        return least_load(candidates, turn, active_id)
    chosen = choose_by_key(prefix_key, candidates, PREFIX_LOAD_FACTOR)
    lightest = min(load_total(c) for c in candidates)
    load = load_total(chosen)
    if load - lightest > BALANCE_ABS and load > lightest * BALANCE_REL:
        return least_load(candidates, turn, active_id)
    return chosen


Policy = Callable[[Sequence[Candidate], Turn, Optional[str]], Candidate]

POLICIES: dict[str, Policy] = {
    "active-first": active_first,
    "round-robin": round_robin,
    "least-latency": least_latency,
    "least-inflight": least_inflight,
    "least-load": least_load,
    "cache-aware": cache_aware,
}
