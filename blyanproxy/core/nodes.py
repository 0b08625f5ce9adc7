"""The ``Node`` value type, its live counters, and the ``NodeRegistry`` that holds the fleet."""

from __future__ import annotations

import secrets
from typing import Any, Callable

import attrs

from blyanproxy.core.healthstate import Health
from blyanproxy.core.loadfigures import LoadFigures
from blyanproxy.core.noderules import check_url_free
from blyanproxy.core.nodeurl import BaseURL, parse_base_url


def new_node_id() -> str:
    """A fresh, stable node id: 16 hex characters."""
    return secrets.token_hex(8)


@attrs.frozen
class Node:
    """One inference node as configured: identity and settings, no live figures.

    ``base_url`` is validated text; ``url`` is its parsed form. A node with
    ``tls_verify`` false skips certificate checks (only when set explicitly).
    ``engine`` is the declared kind (``auto``: detected); ``models``, when not
    empty, are the models it serves as declared (else they are learned).
    ``max_inflight`` caps the requests it has at once (None: ``NODE_MAX_INFLIGHT``).
    """

    id: str
    name: str
    base_url: str
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = attrs.field(factory=dict, eq=False)
    weight: int = 1
    draining: bool = False
    tls_verify: bool = True
    added_at: float = 0.0
    declared_by: str | None = None  # "NODE_3" or "--node" for nodes named in settings
    engine: str = "auto"
    models: tuple[str, ...] = ()
    max_inflight: int | None = None
    url: BaseURL = attrs.field(init=False, eq=False, repr=False)
    name_bytes: bytes = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "url", parse_base_url(self.base_url))
        object.__setattr__(self, "name_bytes", self.name.encode("utf-8"))


@attrs.define
class NodeStats:
    """Live figures of one node, owned by the registry and updated by the data path.

    ``engine`` is the kind detected (``None`` until then) and ``models`` the
    models learned from the node (``None``: not known); health checks set both.
    Whoever takes the node out of service (the health monitor when it goes
    down, a lease when traffic ejects it) calls ``taken_out``; attempts
    waiting on the node for an answer ``watch_out`` for it, to fail over at once.
    """

    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_failure: str | None = None
    latency_ms: float | None = None
    health: Health = attrs.Factory(Health)
    engine: str | None = None
    models: tuple[str, ...] | None = None
    #: The engine's own load figures as last read (``fleet.LoadMonitor``), and this process's
    #: in-flight count at that moment (the policies add what changed since).
    load: LoadFigures | None = None
    in_flight_at_read: int = 0

    @property
    def dispatched_since_read(self) -> int:
        """This process's requests sent to the node since its figures were read, less those that
        ended since (negative when more ended)."""
        return self.in_flight - self.in_flight_at_read if self.load is not None else 0

    _out_watchers: list[Callable[[str], None]] = attrs.field(factory=list, init=False, repr=False, eq=False)

    def watch_out(self, watcher: Callable[[str], None]) -> Callable[[], None]:
        """Call ``watcher(why)`` when the node is taken out of service, until the function returned is called."""
        self._out_watchers.append(watcher)

        def stop() -> None:
            if watcher in self._out_watchers:
                self._out_watchers.remove(watcher)

        return stop

    def taken_out(self, why: str) -> None:
        """The node just went out of service (``"down"`` or ``"ejected"``): tell every watcher
        (one that stops watching meanwhile, as another is told, is not told)."""
        for watcher in list(self._out_watchers):
            if watcher in self._out_watchers:
                watcher(why)

    def observe_latency(self, milliseconds: float) -> None:
        """Fold one measurement into the moving average (weight 0.3 for the newest)."""
        if self.latency_ms is None:
            self.latency_ms = milliseconds
        else:
            self.latency_ms += 0.3 * (milliseconds - self.latency_ms)


class NodeRegistry:
    """The fleet: nodes in registry order, their live figures, the active node's id
    (preferred by ``active-first``), and change listeners.

    Listeners are called with ``(event, node)`` where event is ``"added"``,
    ``"removed"`` or ``"updated"``.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._stats: dict[str, NodeStats] = {}
        self._listeners: list[Callable[[str, Node], None]] = []
        self._ordered: tuple[Node, ...] | None = None  # ``nodes()`` until the next change
        self.active_id: str | None = None

    def listen(self, listener: Callable[[str, Node], None]) -> None:
        """Call ``listener(event, node)`` on every change."""
        self._listeners.append(listener)

    def _announce(self, event: str, node: Node) -> None:
        self._ordered = None
        for listener in list(self._listeners):
            listener(event, node)

    def nodes(self) -> tuple[Node, ...]:
        """Every node, in registry order (the same tuple until the registry changes)."""
        if self._ordered is None:
            self._ordered = tuple(self._nodes.values())
        return self._ordered

    def get(self, node_id: str) -> Node | None:
        """The node with this id, or ``None``."""
        return self._nodes.get(node_id)

    def stats(self, node_id: str) -> NodeStats:
        """The live figures of a node (kept until the node is removed)."""
        return self._stats[node_id]

    def add(self, node: Node) -> Node:
        """Add a node; ``ValueError`` if its id or base URL is already registered."""
        if node.id in self._nodes:
            raise ValueError(f"node id {node.id} is already registered")
        check_url_free(self._nodes.values(), node)
        self._nodes[node.id] = node
        self._stats[node.id] = NodeStats()
        self._announce("added", node)
        return node

    def update(self, node_id: str, **changes: Any) -> Node:
        """Replace a node's settings (``name``, ``tags``, ``metadata``, ``weight``, ``draining``…);
        ``KeyError`` if unknown, ``ValueError`` if the new base URL is taken. Live figures stay."""
        node = attrs.evolve(self._nodes[node_id], **changes)
        check_url_free(self._nodes.values(), node)
        self._nodes[node_id] = node
        self._announce("updated", node)
        return node

    def remove(self, node_id: str) -> Node:
        """Remove a node; ``KeyError`` if unknown. Leases still open keep its figures alive."""
        node = self._nodes.pop(node_id)
        del self._stats[node_id]
        self._announce("removed", node)
        return node
