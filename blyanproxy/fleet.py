"""Keeping the registry and the state file in step: restore at start, save on every change.

Saves happen on node additions, removals and updates, and on runtime changes
of the active node or the policy; never on health ticks. A save that fails
(read-only or full disk) is logged and leaves the previous file intact; a
change made through ``attempt`` is then undone, so the running fleet never
differs from the file because of it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, TypeVar

from .balancer import Balancer
from .logs import logger
from .nodes import Node, NodeRegistry
from .state import FleetState, JsonFileStore, merge

log = logger("fleet")

T = TypeVar("T")


class NotSaved(Exception):
    """A change was undone because the state file could not take it; the message says why."""


class FleetKeeper:
    """Restores the fleet from the store and saves it whenever it changes."""

    def __init__(self, registry: NodeRegistry, balancer: Balancer, store: JsonFileStore) -> None:
        self._registry = registry
        self._balancer = balancer
        self._store = store
        self._runtime_policy: Optional[str] = None
        self._removed: set = set()
        self.last_save_ok = True

    def attempt(self, change: Callable[[], T]) -> T:
        """Make ``change`` (registry edits, ``change_active``, ``change_policy``) and keep it only
        if the state file takes it; otherwise put everything back and raise ``NotSaved``."""
        before = self._registry.checkpoint(), set(self._removed), self._runtime_policy, self._balancer.policy
        self.last_save_ok = True
        result = change()
        if not self.last_save_ok:
            checkpoint, self._removed, self._runtime_policy, self._balancer.policy = before
            self._registry.rollback(checkpoint)
            raise NotSaved(self.last_error)
        return result

    def restore(self, declared: Iterable[Node]) -> FleetState:
        """Load the file (``StateError`` if unusable), merge the declared nodes, fill the registry."""
        state = merge(declared, self._store.load())
        for node in state.nodes:
            self._registry.add(node)
        self._registry.active_id = state.active_id
        self._removed = set(state.removed)
        if state.policy is not None:
            self._runtime_policy = state.policy
            self._balancer.policy = state.policy
        self._registry.listen(self._on_change)
        self.save()
        return state

    def change_policy(self, name: str) -> None:
        """Use ``name`` from now on and across restarts (``KeyError`` if unknown)."""
        self._balancer.policy = name
        self._runtime_policy = name
        self.save()

    def change_active(self, node_id: Optional[str]) -> None:
        """Prefer this node under ``active-first`` (``KeyError`` if unknown)."""
        if node_id is not None and self._registry.get(node_id) is None:
            raise KeyError(node_id)
        self._registry.active_id = node_id
        self.save()

    def _on_change(self, event: str, node: Node) -> None:
        if event == "removed":
            if node.declared_by is not None:
                self._removed.add(node.base_url)
            if self._registry.active_id == node.id:
                self._registry.active_id = None
        elif event == "added":
            self._removed.discard(node.base_url)
        self.save()

    def snapshot(self) -> FleetState:
        """The state as it is now."""
        return FleetState(
            nodes=tuple(self._registry.nodes()),
            active_id=self._registry.active_id,
            policy=self._runtime_policy,
            removed=tuple(sorted(self._removed)),
        )

    def save(self) -> bool:
        """Write the current state; False (and an error in the log) if the file could not be written."""
        try:
            self._store.save(self.snapshot())
        except OSError as exc:
            log.error("could not save the fleet to {path}: {why}", path=self._store.path, why=exc.strerror)
            self.last_save_ok = False
            self.last_error = exc.strerror or str(exc)
            return False
        self.last_save_ok = True
        return True
