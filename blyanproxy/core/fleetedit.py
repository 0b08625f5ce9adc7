"""Admin changes to the fleet as pure functions: ``FleetState -> FleetState``.

Each function here returns a *change*: a function from the fleet as it is to
the fleet as it should be, raising ``KeyError`` (unknown node) or
``ValueError`` (a base URL or id already taken) when it cannot apply. A change
is a value rather than an action so that a store that lost a race (another
process wrote first) can apply the same change again to the fresh fleet: both
writes then take effect, in some order, or the second is refused because it
no longer makes sense. Nothing is ever silently lost.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from blyanproxy.core.fleetstate import FleetState
from blyanproxy.core.noderules import check_url_free
from blyanproxy.core.nodes import Node
from blyanproxy.core.selection import POLICIES

Change = Callable[[FleetState], FleetState]


def find(state: FleetState, node_id: str) -> Node:
    """The node with this id; ``KeyError`` if there is none."""
    for node in state.nodes:
        if node.id == node_id:
            return node
    raise KeyError(node_id)


def add_node(node: Node) -> Change:
    """Append ``node``; a URL that was removed at run time is no longer remembered as removed."""

    def change(state: FleetState) -> FleetState:
        if any(other.id == node.id for other in state.nodes):
            raise ValueError(f"node id {node.id} is already registered")
        check_url_free(state.nodes, node)
        removed = tuple(url for url in state.removed if url != node.base_url)
        return attrs.evolve(state, nodes=state.nodes + (node,), removed=removed)

    return change


def update_node(node_id: str, **fields: Any) -> Change:
    """Replace some of a node's settings (``name``, ``tags``, ``weight``, ``draining``…)."""

    def change(state: FleetState) -> FleetState:
        updated = attrs.evolve(find(state, node_id), **fields)
        check_url_free(state.nodes, updated)
        nodes = tuple(updated if node.id == node_id else node for node in state.nodes)
        return attrs.evolve(state, nodes=nodes)

    return change


def remove_node(node_id: str) -> Change:
    """Remove a node; a declared one is remembered as removed, an active one stops being active."""

    def change(state: FleetState) -> FleetState:
        gone = find(state, node_id)
        removed = state.removed
        if gone.declared_by is not None and gone.base_url not in removed:
            removed = tuple(sorted(removed + (gone.base_url,)))
        return attrs.evolve(
            state,
            nodes=tuple(node for node in state.nodes if node.id != node_id),
            active_id=None if state.active_id == node_id else state.active_id,
            removed=removed,
        )

    return change


def set_active(node_id: str | None) -> Change:
    """Prefer this node under ``active-first`` (``None``: no preference)."""

    def change(state: FleetState) -> FleetState:
        if node_id is not None:
            find(state, node_id)
        return attrs.evolve(state, active_id=node_id)

    return change


def set_policy(name: str) -> Change:
    """Use the policy ``name`` from now on, across restarts (``KeyError`` if unknown)."""
    if name not in POLICIES:
        raise KeyError(name)

    def change(state: FleetState) -> FleetState:
        return attrs.evolve(state, policy=name)

    return change
