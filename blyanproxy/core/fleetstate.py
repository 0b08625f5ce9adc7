"""Durable fleet state as values: the ``FleetState``, its JSON form, the merge rule and
the ``StateStore`` protocol every store implements.

The state keeps the nodes, the active node (by id), a policy chosen at run time,
and the base URLs of declared nodes (``NODE_<n>``, ``--node``) that were
removed at run time. Blyan's format (``{"nodes": [...], "activeIndex": n}``) is
read and converted. Nothing here does I/O.

The merge rule at start-up (``merge``):

1. Nodes in the saved state are restored as they were (id, name, settings, drain flag).
2. A declared node found in the saved state (by base URL, or by its declaration such
   as ``NODE_3`` when the variable now names another URL) takes its name, URL,
   weight, tags, TLS setting, engine and models from the declaration and keeps its id,
   metadata and drain flag from the saved state.
3. A declared node not in the saved state is added (a node newly put in the
   environment appears after a restart), unless it was removed at run time
   (its URL is in ``removed``): a runtime removal survives restarts.
4. A policy set at run time wins over ``SELECTION_POLICY`` until set again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Protocol

import attrs

from blyanproxy.core.noderules import NodeFieldError, node_engine, node_max_inflight, node_models, node_weight
from blyanproxy.core.nodes import Node, new_node_id
from blyanproxy.core.nodeurl import parse_base_url
from blyanproxy.core.selection import POLICIES

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

FORMAT_VERSION = 1


class StateError(Exception):
    """The state file cannot be used; the message names the file and the problem."""


class StoreUnavailable(Exception):
    """The state store did not take a change (disk refused, etcd unreachable or too slow).

    Nothing of the change is applied; the message says why (never a secret).
    """


class StoreConflict(Exception):
    """Another process changed the fleet first; ``fresh`` is the fleet as the store now holds it."""

    def __init__(self, fresh: FleetState) -> None:
        super().__init__("the fleet changed meanwhile")
        self.fresh = fresh


@attrs.frozen
class FleetState:
    """Everything about the fleet that survives a restart."""

    nodes: tuple[Node, ...] = ()
    active_id: str | None = None
    policy: str | None = None
    removed: tuple[str, ...] = ()


def node_to_json(node: Node) -> dict[str, Any]:
    """The JSON form of a node (Blyan's field names where Blyan had them)."""
    return {
        "id": node.id,
        "name": node.name,
        "baseURL": node.base_url,
        "tags": list(node.tags),
        "metadata": node.metadata,
        "weight": node.weight,
        "draining": node.draining,
        "tlsVerify": node.tls_verify,
        "addedAt": node.added_at,
        "declaredBy": node.declared_by,
        "engine": node.engine,
        "models": list(node.models),
        "maxInflight": node.max_inflight,
    }


def node_from_json(data: object) -> Node:
    """A node from its JSON form; ``ValueError`` naming the field when it is unusable."""
    if not isinstance(data, dict):
        raise ValueError("a node must be an object")
    name, base_url = data.get("name"), data.get("baseURL")
    if not isinstance(name, str) or not name:
        raise ValueError("node name missing")
    if not isinstance(base_url, str):
        raise ValueError(f"node {name!r}: baseURL missing")
    parse_base_url(base_url)
    given_id = data.get("id")
    node_id = given_id if isinstance(given_id, str) and given_id else new_node_id()
    tags = data.get("tags") or []
    metadata = data.get("metadata") or {}
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"node {name!r}: tags must be a list of strings")
    if not isinstance(metadata, dict):
        raise ValueError(f"node {name!r}: metadata must be an object")
    try:
        weight = node_weight(data.get("weight", 1))
        engine = node_engine(data.get("engine", "auto"))
        models = node_models(data.get("models", []))
        max_inflight = node_max_inflight(data.get("maxInflight"))
    except NodeFieldError as broken:
        raise ValueError(f"node {name!r}: {broken}") from None
    added = data.get("addedAt", 0.0)
    return Node(
        id=node_id,
        name=name,
        base_url=parse_base_url(base_url).text,
        tags=tuple(tags),
        metadata=metadata,
        weight=weight,
        draining=bool(data.get("draining", False)),
        tls_verify=data.get("tlsVerify", True) is not False,
        added_at=float(added) if isinstance(added, (int, float)) else 0.0,
        declared_by=data.get("declaredBy") if isinstance(data.get("declaredBy"), str) else None,
        engine=engine,
        models=models,
        max_inflight=max_inflight,
    )


def state_to_json(state: FleetState, saved_at: float) -> dict[str, Any]:
    """The file's JSON document for ``state``."""
    return {
        "version": FORMAT_VERSION,
        "nodes": [node_to_json(node) for node in state.nodes],
        "activeId": state.active_id,
        "policy": state.policy,
        "removed": list(state.removed),
        "savedAt": saved_at,
    }


def _ignore(message: str) -> None:
    """Drop a note about a skipped record."""


def state_from_json(document: object, on_skip: Callable[[str], None] = _ignore) -> FleetState:
    """Read our format or Blyan's; ``ValueError`` when the document cannot be used.

    A record that is left out (a base URL listed twice) is told to ``on_skip``.
    """
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
        raise ValueError("expected an object with a list of nodes")
    nodes: list[Node] = []
    seen = set()
    blyan_active_url = None
    index = document.get("activeIndex")
    if "version" not in document and isinstance(index, int) and 0 <= index < len(document["nodes"]):
        entry = document["nodes"][index]
        if isinstance(entry, dict) and isinstance(entry.get("baseURL"), str):
            blyan_active_url = entry["baseURL"]
    for data in document["nodes"]:
        node = node_from_json(data)
        if node.url in seen:
            on_skip(f"skipped node {node.name}: its base URL is listed twice")
            continue
        if node.id in {n.id for n in nodes}:
            node = attrs.evolve(node, id=new_node_id())
        seen.add(node.url)
        nodes.append(node)
    if "version" not in document:  # Blyan's file: the active node by its place in the list
        active_url = parse_base_url(blyan_active_url).text if blyan_active_url else None
        active = next((n.id for n in nodes if n.base_url == active_url), None)
        return FleetState(nodes=tuple(nodes), active_id=active)
    active_id = document.get("activeId")
    policy = document.get("policy")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    removed = document.get("removed") or []
    if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed):
        raise ValueError("removed must be a list of URLs")
    return FleetState(
        nodes=tuple(nodes),
        active_id=active_id if any(n.id == active_id for n in nodes) else None,
        policy=policy if isinstance(policy, str) else None,
        removed=tuple(removed),
    )


def merge(declared: Iterable[Node], saved: FleetState | None) -> FleetState:
    """Apply the module's merge rule to declared nodes and the saved state."""
    if saved is None:
        return FleetState(nodes=tuple(declared))
    nodes = list(saved.nodes)
    by_url = {node.url: index for index, node in enumerate(nodes)}
    by_declaration = {node.declared_by: index for index, node in enumerate(nodes) if node.declared_by}
    removed = set(saved.removed)
    for node in declared:
        index = by_url.get(node.url, by_declaration.get(node.declared_by or ""))
        if index is not None:  # the same node, perhaps at a URL the declaration changed
            nodes[index] = attrs.evolve(
                nodes[index], name=node.name, base_url=node.base_url, weight=node.weight,
                tags=node.tags, tls_verify=node.tls_verify, declared_by=node.declared_by,
                engine=node.engine, models=node.models, max_inflight=node.max_inflight,
            )
        elif node.base_url not in removed:
            nodes.append(node)
    return attrs.evolve(saved, nodes=tuple(nodes))




class StateStore(Protocol):
    """Where the fleet is kept: the JSON file, etcd, or memory only.

    A store is given to the ``FleetKeeper`` when it is built. The keeper asks
    ``load`` once at start, has every change taken by ``commit`` before applying
    it, hears changes made elsewhere through the callable given to ``watch``,
    and calls ``flush`` when the process stops.
    """

    def load(self) -> FleetState | None:
        """The fleet held now, if the store can tell at once (``None``: none, or later by ``watch``)."""

    def commit(self, state: FleetState) -> Deferred[FleetState]:
        """Hold ``state``; fires with the fleet to apply, or fails with ``StoreUnavailable``
        (nothing was written) or ``StoreConflict``."""

    def watch(self, on_change: Callable[[FleetState], None]) -> None:
        """Call ``on_change`` with every fleet another process commits."""

    def flush(self, state: FleetState) -> None:
        """Write ``state`` out once more (at start after the merge, and at exit), if the store keeps a copy."""
