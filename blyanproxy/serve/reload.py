"""SIGHUP: re-read the settings and apply those that can change while connections stay open.

What changes live: the declared nodes (``NODE_<n>``: added, updated, removed,
by the state file's merge rule), ``SELECTION_POLICY`` (unless a policy set at
run time is in force) and ``LOG_LEVEL``. Any other setting that changed is
named in the log with "restart to apply". A file that cannot be read or holds
a bad value changes nothing. Open requests and streams are never touched: a
removed node keeps the requests it has until they end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Callable

import attrs

from blyanproxy.config import LISTEN_OPTION, SETTINGS_BY_FIELD, ConfigError, NodeSpec, Settings
from blyanproxy.core import FleetState, Node, NodeRegistry, merge
from blyanproxy.logs import logger, set_log_level

log = logger("reload")

#: Settings a reload applies; every other change waits for a restart.
LIVE = frozenset({"nodes", "selection_policy", "log_level", "node_max_inflight", "rate_limit_rpm", "rate_limit_tpm",
                  "rate_limit_file"})
#: The admission settings SIGHUP applies through the ``on_reload`` hook (and RATE_LIMIT_FILE is read again).
_ADMISSION_FIELDS = ("node_max_inflight", "rate_limit_rpm", "rate_limit_tpm", "rate_limit_file")
#: The node fields a declaration owns (the rest: id, metadata, drain flag, stay).
_DECLARED_FIELDS = ("name", "base_url", "weight", "tags", "tls_verify", "declared_by", "engine", "models",
                    "max_inflight")


@attrs.frozen
class NodePlan:
    """What a reload does to the registry: nodes to add, ``(id, changes)`` to apply, nodes to remove."""

    add: tuple[Node, ...] = ()
    update: tuple[tuple[str, dict], ...] = ()
    remove: tuple[Node, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.update or self.remove)


def plan_nodes(current: Sequence[Node], removed: Iterable[str], declared: Sequence[Node]) -> NodePlan:
    """Bring the registry's declared nodes in line with ``declared``, by ``state.merge``'s rule.

    A declaration matching a node (by URL, or by its variable) updates it; a
    new one is added unless it was removed at run time (``removed``); a node
    whose declaration is gone is removed. Nodes added at run time stay.
    """
    merged = merge(declared, FleetState(nodes=tuple(current), removed=tuple(removed)))
    before = {node.id: node for node in current}
    declared_urls = {node.url for node in declared}
    claimed = {node.id for node in merged.nodes if node.url in declared_urls}
    update = []
    for node in merged.nodes:
        old = before.get(node.id)
        if old is not None:
            changes = {f: getattr(node, f) for f in _DECLARED_FIELDS if getattr(node, f) != getattr(old, f)}
            if changes:
                update.append((node.id, changes))
    return NodePlan(
        add=tuple(node for node in merged.nodes if node.id not in before),
        update=tuple(update),
        remove=tuple(node for node in current if node.declared_by is not None and node.id not in claimed),
    )


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The names (variables, or options) of settings that changed but only apply at start."""
    names = []
    for field in attrs.fields(Settings):
        if field.name in LIVE or getattr(old, field.name) == getattr(new, field.name):
            continue
        setting = LISTEN_OPTION if field.name == "listen" else SETTINGS_BY_FIELD.get(field.name)
        names.append((setting.env or f"--{setting.option}") if setting else field.name)
    return names


def fleet_after(state: FleetState, plan: NodePlan) -> FleetState:
    """The fleet with ``plan`` carried out (a fleet edit for ``FleetKeeper.edit``).

    A node no longer declared is dropped without being remembered as removed
    at run time, so declaring its URL again brings it back.
    """
    gone = {node.id for node in plan.remove}
    changes = dict(plan.update)
    nodes = [attrs.evolve(node, **changes[node.id]) if node.id in changes else node
             for node in state.nodes if node.id not in gone]
    return attrs.evolve(
        state,
        nodes=tuple(nodes) + tuple(plan.add),
        active_id=None if state.active_id in gone else state.active_id,
    )


class Reloader:
    """Re-reads the settings (``load``) and applies what can change live to the running proxy.

    ``make_node`` turns a ``NodeSpec`` into a new registry ``Node``; ``keeper``
    (the ``FleetKeeper``) knows the runtime removals and policy, and carries
    the node changes out through the state store. ``on_reload`` gets the new
    settings to apply the admission ones (``serve.admission``).
    """

    def __init__(self, settings: Settings, load: Callable[[], Settings], registry: NodeRegistry,
                 keeper, make_node: Callable[[NodeSpec], Node],
                 on_reload: Callable[[Settings], object] | None = None) -> None:
        self.settings = settings
        self._on_reload = on_reload
        self._load = load
        self._registry = registry
        self._keeper = keeper
        self._make_node = make_node

    def reload(self) -> bool:
        """Apply the settings as they are now; False (and nothing changed) when they are unusable."""
        source = self.settings.env_file or "the environment"
        try:
            new = self._load()
        except ConfigError as problem:
            log.error("reload: {problem}; nothing changed", problem=str(problem))
            return False
        runtime = self._keeper.snapshot()
        plan = plan_nodes(self._registry.nodes(), runtime.removed, [self._make_node(s) for s in new.nodes])
        if plan:
            # Through the keeper: saved (or shared through etcd) like an admin change.
            self._keeper.edit(lambda state: fleet_after(state, plan)).addErrback(
                lambda failure: log.error("reload: could not apply the nodes: {problem}",
                                          problem=failure.getErrorMessage()))
        for name in restart_needed(self.settings, new):
            log.warn("reload: {name} changed; restart to apply", name=name)
        self._apply_policy(new.selection_policy, runtime.policy)
        if new.log_level != self.settings.log_level:
            set_log_level(new.log_level)
            log.info("reload: log level {name}", name=new.log_level)
        if self._on_reload is not None:
            self._on_reload(new)
        self.settings = attrs.evolve(
            self.settings, nodes=new.nodes, selection_policy=new.selection_policy, log_level=new.log_level,
            **{name: getattr(new, name) for name in _ADMISSION_FIELDS},
        )
        log.info("reloaded {source}: {added} node(s) added, {updated} updated, {removed} removed",
                 source=source, added=len(plan.add), updated=len(plan.update), removed=len(plan.remove))
        return True

    def _apply_policy(self, policy: str, runtime_policy: str | None) -> None:
        if policy == self.settings.selection_policy:
            return
        if runtime_policy is not None:
            log.warn("reload: SELECTION_POLICY changed, but the policy set at run time ({policy}) stays",
                     policy=runtime_policy)
            return
        self._keeper.set_default_policy(policy)
        log.info("reload: policy {policy}", policy=policy)
