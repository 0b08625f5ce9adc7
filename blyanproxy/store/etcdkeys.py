"""How the fleet is laid out in etcd, and the pure conversions both ways.

Under the prefix (``/blyanproxy/`` for ``etcd://host:2379/blyanproxy``)::

    nodes/<id>        one key per node: its JSON (as in the state file), drain flag included
    active            the active node's id (absent: none)
    policy            a selection policy set at run time (absent: SELECTION_POLICY)
    removed/<url>     a declared node removed at run time (the value is its URL)
    changed           who wrote last and when; every write puts it

One key per node keeps each watch event small and tells exactly what changed.
Every write is one transaction that compares ``changed``'s ``mod_revision``
with the one this process last saw and puts ``changed`` again: two writes
from stale views can never both pass, so the one that loses re-reads the
fleet (in the same round trip) and is worked out again on the fresh one.
Nodes are listed in the order their keys were created.
"""

from __future__ import annotations

import base64
import json
from typing import Callable

import attrs

from blyanproxy.core import POLICIES, FleetState, Node, node_from_json, node_to_json, parse_base_url

CHANGED = "changed"


@attrs.frozen
class KeyValue:
    """One key as etcd holds it: its value and revisions."""

    value: bytes
    create_revision: int
    mod_revision: int


def b64(data: bytes) -> str:
    """etcd's JSON gateway carries keys and values in base64."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """The bytes of a base64 key or value from the gateway (absent: empty)."""
    return base64.b64decode(text or "")


def range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def state_keys(state: FleetState, prefix: bytes) -> dict[bytes, bytes]:
    """Every key (but ``changed``) and value that hold ``state``."""
    keys = {
        prefix + b"nodes/" + node.id.encode(): json.dumps(node_to_json(node), sort_keys=True).encode()
        for node in state.nodes
    }
    if state.active_id is not None:
        keys[prefix + b"active"] = state.active_id.encode()
    if state.policy is not None:
        keys[prefix + b"policy"] = state.policy.encode()
    for url in state.removed:
        keys[prefix + b"removed/" + url.encode()] = url.encode()
    return keys


def _no_note(key: bytes, problem: str) -> None:
    """Drop a note about a skipped key."""


def state_from_keys(kvs: dict[bytes, KeyValue], prefix: bytes,
                    on_skip: Callable[[bytes, str], None] = _no_note) -> FleetState | None:
    """The fleet held by ``kvs`` (``None`` when the prefix is empty).

    Every value is checked as admin input is (``core.node_from_json`` for a
    node, whose id must be its key's; a policy of ``POLICIES``; a removed
    entry that is a base URL; an active id that is text). A key that breaks a
    rule is left out and told to ``on_skip(key, problem)``; the rest is the fleet.
    """
    if not kvs:
        return None
    nodes, active, policy, removed = [], None, None, []
    for key, kv in sorted(kvs.items(), key=lambda item: (item[1].create_revision, item[0])):
        name = key[len(prefix):]
        try:
            if name.startswith(b"nodes/"):
                nodes.append(_node(name[len(b"nodes/"):], kv.value))
            elif name == b"active":
                active = kv.value.decode("utf-8")
            elif name == b"policy":
                policy = _policy(kv.value)
            elif name.startswith(b"removed/"):
                removed.append(parse_base_url(kv.value.decode("utf-8")).text)
        except (ValueError, UnicodeDecodeError) as exc:
            on_skip(key, str(exc))
    return FleetState(
        nodes=tuple(nodes),
        active_id=active if any(node.id == active for node in nodes) else None,
        policy=policy,
        removed=tuple(sorted(removed)),
    )


def _node(key_id: bytes, value: bytes) -> Node:
    node = node_from_json(json.loads(value))
    if node.id.encode() != key_id:
        raise ValueError(f"the node's id {node.id} is not its key's")
    return node


def _policy(value: bytes) -> str:
    policy = value.decode("utf-8")
    if policy not in POLICIES:
        raise ValueError(f"{policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def shown_key(key: bytes) -> str:
    """An etcd key as a log line may show it: anything but printable ASCII escaped."""
    return repr(key)[2:-1]


def write_operations(held: dict[bytes, KeyValue], wanted: dict[bytes, bytes], lock: bytes) -> list:
    """The txn operations that turn the keys ``held`` into ``wanted``, leaving the ``lock`` key alone."""
    operations = [
        {"request_put": {"key": b64(key), "value": b64(value)}}
        for key, value in wanted.items()
        if key not in held or held[key].value != value
    ]
    operations += [
        {"request_delete_range": {"key": b64(key)}}
        for key in held
        if key not in wanted and key != lock
    ]
    return operations


def kvs_from_range(response: dict) -> dict[bytes, KeyValue]:
    """The keys of a range response (``/v3/kv/range`` or a txn's ``response_range``)."""
    return {unb64(kv["key"]): _key_value(kv) for kv in response.get("kvs", [])}


def _key_value(kv: dict) -> KeyValue:
    return KeyValue(
        value=unb64(kv.get("value", "")),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
    )


def apply_events(kvs: dict[bytes, KeyValue], events: list, after: int) -> bool:
    """Fold watch ``events`` newer than revision ``after`` into ``kvs``; True if anything changed."""
    changed = False
    for event in events:
        kv = event.get("kv", {})
        if int(kv.get("mod_revision", 0)) <= after:
            continue
        key = unb64(kv["key"])
        if event.get("type") == "DELETE":
            changed = kvs.pop(key, None) is not None or changed
        else:
            kvs[key] = _key_value(kv)
            changed = True
    return changed
