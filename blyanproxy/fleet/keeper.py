"""Keeping the registry and the state store in step.

Every admin change is a pure ``fleetedit`` change. ``FleetKeeper.edit`` works
it out on the fleet as this process knows it, has the store take the result,
and only then applies it to the ``NodeRegistry`` and the ``Balancer``: a
change the store refused (``StoreUnavailable``) is not live anywhere. When
the store answers that another process wrote first (``StoreConflict``), the
fresh fleet is applied and the change worked out again on it, a few times at
most. Changes made by other processes arrive through ``apply`` (the etcd
watch); applying is by difference, so a process's own change, echoed back, is
applied once. Health state and live counters belong to this process and are
never stored.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred

from blyanproxy.core import Change, FleetState, Node, NodeRegistry, StateStore, StoreConflict, merge, node_to_json
from blyanproxy.fleet.balancer import Balancer
from blyanproxy.logs import logger

log = logger("fleet")

#: How many times a change is worked out again after losing a race to another process.
EDIT_ATTEMPTS = 10


class FleetKeeper:
    """Owns the fleet's durable parts in one process: restore, edit through the store, apply."""

    def __init__(self, registry: NodeRegistry, balancer: Balancer, store: StateStore) -> None:
        """``store`` takes every change before it is applied and tells changes made elsewhere."""
        self._registry = registry
        self._balancer = balancer
        self._store = store
        self._default_policy = balancer.policy
        self._runtime_policy: str | None = None
        self._removed: tuple = ()
        self._one_at_a_time = DeferredLock()  # this process's own edits never race each other
        store.watch(self.apply)

    def restore(self, declared: Iterable[Node]) -> FleetState:
        """Merge the declared nodes into what the store holds (see ``fleetstate.merge``), apply
        the result and have the store write it out (``StateError``/``OSError`` if it cannot)."""
        state = merge(declared, self._store.load())
        self.apply(state)
        self._store.flush(state)
        return state

    def flush(self) -> None:
        """Have the store write the fleet out once more (before the process exits)."""
        self._store.flush(self.snapshot())

    def set_default_policy(self, name: str) -> None:
        """The policy in force while none is set at run time (``SELECTION_POLICY``, on reload)."""
        self._default_policy = name
        if self._runtime_policy is None:
            self._balancer.policy = name

    def snapshot(self) -> FleetState:
        """The fleet as this process has it now."""
        return FleetState(
            nodes=tuple(self._registry.nodes()),
            active_id=self._registry.active_id,
            policy=self._runtime_policy,
            removed=self._removed,
        )

    def edit(self, change: Change) -> Deferred:
        """Apply ``change`` through the store; fires with the fleet applied.

        Edits of one process are taken one after the other. Fails with the
        change's own ``KeyError``/``ValueError``, the store's
        ``StoreUnavailable``, or ``StoreConflict`` after ``EDIT_ATTEMPTS`` lost races.
        """
        return self._one_at_a_time.run(self._edit, change, EDIT_ATTEMPTS)

    def _edit(self, change: Change, attempts: int) -> Deferred:
        try:
            wanted = change(self.snapshot())
        except (KeyError, ValueError) as exc:
            return fail(exc)
        committed = maybeDeferred(self._store.commit, wanted)

        def lost_race(failure):
            failure.trap(StoreConflict)
            self.apply(failure.value.fresh)
            if attempts <= 1:
                return failure
            log.info("the fleet changed in another process meanwhile; applying the change again")
            return self._edit(change, attempts - 1)

        committed.addCallbacks(self._applied, lost_race)
        return committed

    def _applied(self, state: FleetState) -> FleetState:
        self.apply(state)
        return state

    def apply(self, state: FleetState) -> None:
        """Make the registry and the balancer show ``state``: removals first, then changes and additions.

        Live figures of nodes that stay are kept. A node whose base URL is
        still taken (a swap of URLs between two nodes) is skipped with a warning.
        """
        registry = self._registry
        wanted = {node.id: node for node in state.nodes}
        for node in registry.nodes():
            if node.id not in wanted:
                registry.remove(node.id)
        for node in state.nodes:
            current = registry.get(node.id)
            try:
                if current is None:
                    registry.add(node)
                elif node_to_json(current) != node_to_json(node):
                    registry.update(node.id, **_settings_of(node))
            except ValueError as exc:
                log.warn("could not apply node {name}: {why}", name=node.name, why=str(exc))
        registry.active_id = state.active_id if registry.get(state.active_id or "") else None
        self._runtime_policy = state.policy
        self._removed = tuple(state.removed)
        self._balancer.policy = state.policy or self._default_policy


def _settings_of(node: Node) -> dict:
    return {
        "name": node.name, "base_url": node.base_url, "tags": node.tags, "metadata": node.metadata,
        "weight": node.weight, "draining": node.draining, "tls_verify": node.tls_verify,
        "added_at": node.added_at, "declared_by": node.declared_by,
    }
