"""The etcd key layout: a fleet to keys and back, the write operations, watch events, STATE_STORE values."""

import json

import pytest

from blyanproxy.core.fleetstate import FleetState
from blyanproxy.core.nodes import Node
from blyanproxy.store.etcdkeys import (
    KeyValue,
    apply_events,
    b64,
    range_end,
    state_from_keys,
    state_keys,
    write_operations,
)
from blyanproxy.store.storeurl import EtcdLocation, parse_state_store

PREFIX = b"/fleet/"


def node(index, **fields):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


def held(state, revision=1):
    """The keys of ``state`` as etcd would hold them, created in node order."""
    return {key: KeyValue(value, revision + i, revision + i)
            for i, (key, value) in enumerate(state_keys(state, PREFIX).items())}


def test_a_fleet_round_trips_through_its_keys_in_creation_order():
    state = FleetState(nodes=(node(2, draining=True, metadata={"gpu": "A100"}), node(1)), active_id="n1",
                       policy="round-robin", removed=("http://10.0.0.9:8000",))
    keys = state_keys(state, PREFIX)
    assert set(keys) == {b"/fleet/nodes/n2", b"/fleet/nodes/n1", b"/fleet/active", b"/fleet/policy",
                         b"/fleet/removed/http://10.0.0.9:8000"}
    restored = state_from_keys(held(state), PREFIX)
    assert restored == state and restored.nodes[0].metadata == {"gpu": "A100"}
    assert state_from_keys({}, PREFIX) is None


def test_an_active_id_naming_no_node_is_dropped():
    assert state_from_keys({b"/fleet/active": KeyValue(b"gone", 1, 1)}, PREFIX).active_id is None


def skipped_keys(kvs):
    """``(state, {key: problem})``: the fleet of ``kvs`` and the keys left out of it."""
    skipped = {}
    state = state_from_keys(kvs, PREFIX, skipped.__setitem__)
    return state, skipped


def node_record(index, **fields):
    document = {"id": f"n{index}", "name": f"node{index}", "baseURL": f"http://10.0.0.{index}:8000", **fields}
    return json.dumps(document).encode()


@pytest.mark.parametrize("key, value, problem", [
    (b"/fleet/nodes/n2", node_record(2, name="evil\r\nSet-Cookie: injected=1"), "name must be"),
    (b"/fleet/nodes/n2", node_record(2, metadata={"healthPath": "/h\r\nX: 1"}), "healthPath must be"),
    (b"/fleet/nodes/n2", node_record(2, tags="a100"), "tags must be"),
    (b"/fleet/nodes/x", b'{"name": "x"}', "baseURL missing"),
    (b"/fleet/nodes/n2", b"{not json", "Expecting property name"),
    (b"/fleet/nodes/n2", b"\xff", "can't decode"),
    (b"/fleet/nodes/other", node_record(2), "is not its key's"),
    (b"/fleet/policy", b"fastest", "'fastest' is not one of"),
    (b"/fleet/policy", b"\xff", "can't decode"),
    (b"/fleet/removed/x", b"ftp://x", "must start with http"),
    (b"/fleet/active", b"\xff", "can't decode"),
])
def test_a_key_breaking_a_rule_is_left_out_and_told_the_rest_is_the_fleet(key, value, problem):
    kvs = {b"/fleet/nodes/n1": KeyValue(node_record(1), 1, 1), key: KeyValue(value, 2, 2)}
    state, skipped = skipped_keys(kvs)
    assert [n.id for n in state.nodes] == ["n1"] and state.policy is None and state.removed == ()
    assert list(skipped) == [key] and problem in skipped[key]


def test_write_operations_touch_only_what_changed_and_never_the_lock():
    before = FleetState(nodes=(node(1), node(2)), active_id="n2")
    after = FleetState(nodes=(node(1), node(3, weight=2)), policy="least-inflight")
    current = held(before)
    current[b"/fleet/changed"] = KeyValue(b"{}", 9, 9)
    operations = write_operations(current, state_keys(after, PREFIX), b"/fleet/changed")
    puts = {op["request_put"]["key"] for op in operations if "request_put" in op}
    deletes = {op["request_delete_range"]["key"] for op in operations if "request_delete_range" in op}
    assert puts == {b64(b"/fleet/nodes/n3"), b64(b"/fleet/policy")}
    assert deletes == {b64(b"/fleet/nodes/n2"), b64(b"/fleet/active")}
    assert write_operations(held(after), state_keys(after, PREFIX), b"/fleet/changed") == []


def test_watch_events_at_or_below_the_known_revision_are_skipped():
    kvs = held(FleetState(nodes=(node(1),)), revision=5)
    value = json.dumps({"name": "late", "baseURL": "http://10.0.0.7:8000", "id": "n7"}).encode()
    events = [
        {"kv": {"key": b64(b"/fleet/nodes/n7"), "value": b64(value), "create_revision": "4", "mod_revision": "4"}},
        {"type": "DELETE", "kv": {"key": b64(b"/fleet/nodes/n1"), "mod_revision": "6"}},
    ]
    assert apply_events(kvs, events, after=5) is True
    assert kvs == {}  # the old put is skipped, the newer delete applied
    assert apply_events(kvs, events[1:], after=6) is False


def test_range_end_covers_exactly_the_prefix():
    assert range_end(b"/fleet/") == b"/fleet0"


@pytest.mark.parametrize("text, expected", [
    ("file", None),
    ("etcd://127.0.0.1:2379/blyanproxy", EtcdLocation("http://127.0.0.1:2379", b"/blyanproxy/")),
    ("etcd://etcd.internal/a/b/", EtcdLocation("http://etcd.internal:2379", b"/a/b/")),
    ("etcd://[::1]:2380/p", EtcdLocation("http://[::1]:2380", b"/p/")),
    ("etcd+https://etcd.internal/blyanproxy", EtcdLocation("https://etcd.internal:2379", b"/blyanproxy/")),
])
def test_state_store_values(text, expected):
    assert parse_state_store(text) == expected


@pytest.mark.parametrize("text", ["etcd://host", "http://host/p", "etcd://u:pw@host/p", "etcd://host:0x/p",
                                  "etcd://host/p?x=1", "files", "etcd+http://host/p", "https://host/p"])
def test_unusable_state_store_values(text):
    with pytest.raises(ValueError):
        parse_state_store(text)


@pytest.mark.parametrize("text", ["etcd+https://root:Hunter2-secret@host/p", "etcd://:Hunter2-secret@host/p",
                                  "etcd://Hunter2-secret@host/p"])
def test_credentials_in_the_state_store_are_refused_without_repeating_them(text):
    with pytest.raises(ValueError) as caught:
        parse_state_store(text)
    assert "ETCD_USER and ETCD_PASSWORD_FILE" in str(caught.value) and "Hunter2" not in str(caught.value)
