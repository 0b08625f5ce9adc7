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

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Protocol

import attrs

from blyanproxy.core.noderules import (
    NodeFieldError,
    node_declaration,
    node_engine,
    node_id,
    node_max_inflight,
    node_metadata,
    node_models,
    node_name,
    node_tags,
    node_weight,
)
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
    """A node from its JSON form, every field checked by the node field rules as admin input is.

    ``ValueError`` naming the node (its name escaped) and the field when it
    is unusable. A missing or non-text id gets a fresh one (Blyan's files);
    fields this version does not know are ignored.
    """
    if not isinstance(data, dict):
        raise ValueError("a node must be an object")
    name, base_url = data.get("name"), data.get("baseURL")
    if not isinstance(name, str) or not name:
        raise ValueError("node name missing")
    label = f"node {_shown(name)}"
    if not isinstance(base_url, str):
        raise ValueError(f"{label}: baseURL missing")
    try:
        url = parse_base_url(base_url)
    except ValueError as broken:
        raise ValueError(f"{label}: baseURL {broken}") from None
    given_id = data.get("id")
    added = data.get("addedAt", 0.0)
    try:
        return Node(
            id=node_id(given_id) if isinstance(given_id, str) and given_id else new_node_id(),
            name=node_name(name),
            base_url=url.text,
            tags=node_tags(_given(data, "tags", [])),
            metadata=node_metadata(_given(data, "metadata", {})),
            weight=node_weight(data.get("weight", 1)),
            draining=_flag(data, "draining", False),
            tls_verify=_flag(data, "tlsVerify", True),
            added_at=float(added) if isinstance(added, (int, float)) and math.isfinite(added) else 0.0,
            declared_by=node_declaration(data.get("declaredBy")),
            engine=node_engine(_given(data, "engine", "auto")),
            models=node_models(_given(data, "models", [])),
            max_inflight=node_max_inflight(data.get("maxInflight")),
        )
    except NodeFieldError as broken:
        raise ValueError(f"{label}: {broken}") from None


def _shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for a log line or an error: control and line-breaking characters escaped, cut at ``limit``."""
    quoted = repr(text[:limit])
    return quoted + "..." if len(text) > limit else quoted


def _given(data: dict[str, Any], field: str, default: object) -> object:
    """``data[field]``, or ``default`` when it is missing or null."""
    value = data.get(field)
    return default if value is None else value


def _flag(data: dict[str, Any], field: str, default: bool) -> bool:
    value = data.get(field, default)
    if not isinstance(value, bool):
        raise NodeFieldError(field, "must be true or false")
    return value


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
    """Read our format or Blyan's; ``ValueError`` when the document as a whole cannot be used.

    A document that is not an object with a list of nodes (and, in our
    format, a list ``removed``) cannot be used, nor one whose node records
    are all unusable. Otherwise each record that breaks a rule — a node (see
    ``node_from_json``), a base URL listed twice, an entry of ``removed``, the
    policy, the active id — is left out and told to ``on_skip``, naming it.
    """
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
        raise ValueError("expected an object with a list of nodes")
    nodes: list[Node] = []
    seen = set()
    refused: list[str] = []
    blyan_active_url = None
    index = document.get("activeIndex")
    if "version" not in document and isinstance(index, int) and 0 <= index < len(document["nodes"]):
        entry = document["nodes"][index]
        if isinstance(entry, dict) and isinstance(entry.get("baseURL"), str):
            blyan_active_url = entry["baseURL"]
    for place, data in enumerate(document["nodes"], 1):
        try:
            node = node_from_json(data)
        except ValueError as broken:
            refused.append(f"node record {place}: {broken}")
            on_skip(f"skipped node record {place}: {broken}")
            continue
        if node.url in seen:
            on_skip(f"skipped node {_shown(node.name)}: its base URL is listed twice")
            continue
        if node.id in {n.id for n in nodes}:
            node = attrs.evolve(node, id=new_node_id())
        seen.add(node.url)
        nodes.append(node)
    if refused and not nodes:
        raise ValueError(f"no node record is usable ({refused[0]})")
    if "version" not in document:  # Blyan's file: the active node by its place in the list
        try:
            active_url = parse_base_url(blyan_active_url).text if blyan_active_url else None
        except ValueError:
            active_url = None  # that record was skipped
        active = next((n.id for n in nodes if n.base_url == active_url), None)
        return FleetState(nodes=tuple(nodes), active_id=active)
    removed = document.get("removed") or []
    if not isinstance(removed, list):
        raise ValueError("removed must be a list of URLs")
    return FleetState(
        nodes=tuple(nodes),
        active_id=_active_id(document.get("activeId"), nodes, on_skip),
        policy=_policy_or_none(document.get("policy"), on_skip),
        removed=tuple(url for url in removed if _removed_url(url, on_skip)),
    )


def _policy_or_none(value: object, on_skip: Callable[[str], None]) -> str | None:
    """A stored policy when it is one of ``POLICIES``; anything else is told to ``on_skip`` and is none."""
    if value is None or (isinstance(value, str) and value in POLICIES):
        return value
    on_skip(f"skipped the policy {_shown(str(value))}: not one of {', '.join(POLICIES)}")
    return None


def _removed_url(value: object, on_skip: Callable[[str], None]) -> bool:
    """Whether a stored entry of ``removed`` is a node base URL (else it is told to ``on_skip``)."""
    try:
        if not isinstance(value, str):
            raise ValueError("must be text")
        parse_base_url(value)
    except ValueError as broken:
        on_skip(f"skipped the removed entry {_shown(str(value))}: {broken}")
        return False
    return True


def _active_id(value: object, nodes: list[Node], on_skip: Callable[[str], None]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        on_skip("skipped the active id: it must be text")
        return None
    return value if any(n.id == value for n in nodes) else None


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
