"""Durable fleet state: what the JSON file holds, how it is read and written, and the merge rule.

The file keeps the nodes, the active node (by id), a policy chosen at run time,
and the base URLs of declared nodes (``NODE_<n>``, ``--node``) that were
removed at run time. Writes are atomic (temporary file, fsync, rename, fsync of
the directory); the file is always present, and the previous good version is
kept as ``<file>.bak``. A file that cannot be read or parsed is never
overwritten: loading raises ``StateError`` naming the file and the problem,
unless a readable backup exists, which is used (and said so) after the damaged
file is moved aside. Blyan's format (``{"nodes": [...], "activeIndex": n}``) is
read and converted.

The merge rule at start-up (``merge``):

1. Nodes in the file are restored as they were (id, name, settings, drain flag).
2. A declared node found in the file (by base URL, or by its declaration such
   as ``NODE_3`` when the variable now names another URL) takes its name, URL,
   weight, tags and TLS setting from the declaration and keeps its id,
   metadata and drain flag from the file.
3. A declared node not in the file is added (a node newly put in the
   environment appears after a restart), unless it was removed at run time
   (its URL is in ``removed``): a runtime removal survives restarts.
4. A policy set at run time wins over ``SELECTION_POLICY`` until set again.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, List, Optional, Tuple

import attrs
from twisted.internet.defer import Deferred, fail, succeed

from blyanproxy.logs import logger
from blyanproxy.core.nodes import Node, new_node_id
from blyanproxy.core.nodeurl import parse_base_url
from blyanproxy.core.selection import POLICIES

log = logger("state")

FORMAT_VERSION = 1


class StateError(Exception):
    """The state file cannot be used; the message names the file and the problem."""


class StoreUnavailable(Exception):
    """The state store did not take a change (disk refused, etcd unreachable or too slow).

    Nothing of the change is applied; the message says why (never a secret).
    """


class StoreConflict(Exception):
    """Another process changed the fleet first; ``fresh`` is the fleet as the store now holds it."""

    def __init__(self, fresh: "FleetState") -> None:
        super().__init__("the fleet changed meanwhile")
        self.fresh = fresh


@attrs.frozen
class FleetState:
    """Everything about the fleet that survives a restart."""

    nodes: Tuple[Node, ...] = ()
    active_id: Optional[str] = None
    policy: Optional[str] = None
    removed: Tuple[str, ...] = ()


def node_to_json(node: Node) -> dict:
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
    }


def node_from_json(data: dict) -> Node:
    """A node from its JSON form; ``ValueError`` naming the field when it is unusable."""
    if not isinstance(data, dict):
        raise ValueError("a node must be an object")
    name, base_url = data.get("name"), data.get("baseURL")
    if not isinstance(name, str) or not name:
        raise ValueError("node name missing")
    if not isinstance(base_url, str):
        raise ValueError(f"node {name!r}: baseURL missing")
    parse_base_url(base_url)
    node_id = data.get("id") if isinstance(data.get("id"), str) and data.get("id") else new_node_id()
    tags = data.get("tags") or []
    metadata = data.get("metadata") or {}
    weight = data.get("weight", 1)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"node {name!r}: tags must be a list of strings")
    if not isinstance(metadata, dict):
        raise ValueError(f"node {name!r}: metadata must be an object")
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
        raise ValueError(f"node {name!r}: weight must be a whole number from 1 to 1000")
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
    )


def state_to_json(state: FleetState, saved_at: float) -> dict:
    """The file's JSON document for ``state``."""
    return {
        "version": FORMAT_VERSION,
        "nodes": [node_to_json(node) for node in state.nodes],
        "activeId": state.active_id,
        "policy": state.policy,
        "removed": list(state.removed),
        "savedAt": saved_at,
    }


def state_from_json(document) -> FleetState:
    """Read our format or Blyan's; ``ValueError`` when the document cannot be used."""
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
        raise ValueError("expected an object with a list of nodes")
    nodes: List[Node] = []
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
            log.warn("state: skipped node {name}: its base URL is listed twice", name=node.name)
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


def merge(declared: Iterable[Node], saved: Optional[FleetState]) -> FleetState:
    """Apply the module's merge rule to declared nodes and the saved state."""
    if saved is None:
        return FleetState(nodes=tuple(declared))
    nodes = list(saved.nodes)
    by_url = {node.url: index for index, node in enumerate(nodes)}
    by_declaration = {node.declared_by: index for index, node in enumerate(nodes) if node.declared_by}
    removed = set(saved.removed)
    for node in declared:
        index = by_url.get(node.url, by_declaration.get(node.declared_by))
        if index is not None:  # the same node, perhaps at a URL the declaration changed
            nodes[index] = attrs.evolve(
                nodes[index], name=node.name, base_url=node.base_url, weight=node.weight,
                tags=node.tags, tls_verify=node.tls_verify, declared_by=node.declared_by,
            )
        elif node.base_url not in removed:
            nodes.append(node)
    return attrs.evolve(saved, nodes=tuple(nodes))


class JsonFileStore:
    """The ``StateStore`` kept in one JSON file (see the module docstring).

    A store offers ``commit(state) -> Deferred[FleetState]``: it fires with the
    fleet to apply once the store holds ``state``, or fails with
    ``StoreUnavailable`` (nothing was written) or ``StoreConflict``. This one
    writes at once and never conflicts: it serves one process.
    """

    def __init__(self, path: str, clock) -> None:
        self.path = path
        self.backup = path + ".bak"
        self._clock = clock
        self._primary_good = False  # True once the file at ``path`` is known to be a good save

    def load(self) -> Optional[FleetState]:
        """The saved state, ``None`` on a first start, or ``StateError``.

        A damaged file with a readable backup is moved aside (``<file>.damaged-<time>``)
        and the backup is used; without a backup it is left alone and loading fails.
        """
        self._primary_good = False
        if not os.path.exists(self.path):
            if os.path.exists(self.backup):
                log.warn("state file {path} is missing; using its backup", path=self.path)
                return self._read(self.backup)
            return None
        try:
            state = self._read(self.path)
        except StateError as problem:
            if not os.path.exists(self.backup):
                raise
            backup = self._read(self.backup)
            aside = f"{self.path}.damaged-{int(self._clock.seconds())}"
            os.replace(self.path, aside)
            log.error("{problem}; moved it to {aside} and using the backup {backup}",
                      problem=str(problem), aside=aside, backup=self.backup)
            return backup
        self._primary_good = True
        return state

    def _read(self, path: str) -> FleetState:
        try:
            with open(path, "rb") as source:
                document = json.loads(source.read().decode("utf-8"))
            return state_from_json(document)
        except OSError as exc:
            raise StateError(f"state file {path} cannot be read: {exc.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(f"state file {path} is not valid JSON: {exc}") from None
        except ValueError as exc:
            raise StateError(f"state file {path} cannot be used: {exc}") from None

    def commit(self, state: FleetState) -> Deferred:
        """Save ``state``; fails with ``StoreUnavailable`` when the file cannot be written."""
        try:
            self.save(state)
        except OSError as exc:
            log.error("could not save the fleet to {path}: {why}", path=self.path, why=exc.strerror)
            return fail(StoreUnavailable(f"the state file could not be written ({exc.strerror})"))
        return succeed(state)

    def save(self, state: FleetState) -> None:
        """Write ``state`` atomically; ``OSError`` if the directory refuses (nothing half-written).

        The file is always present: the previous version is linked (or copied) to
        the backup first, and only when it is known to be good, then the new one
        replaces it in one rename.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        payload = json.dumps(state_to_json(state, self._clock.seconds()), indent=2).encode("utf-8")
        temporary = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as target:
                target.write(payload)
                target.flush()
                os.fsync(target.fileno())
            if self._primary_good and os.path.exists(self.path):
                self._keep_as_backup()
            os.replace(temporary, self.path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        self._primary_good = True
        _fsync_directory(directory)

    def _keep_as_backup(self) -> None:
        staged = self.backup + ".tmp"
        if os.path.exists(staged):
            os.unlink(staged)
        try:
            os.link(self.path, staged)
        except OSError:  # no hard links here: copy instead
            shutil.copyfile(self.path, staged)
        os.replace(staged, self.backup)


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
