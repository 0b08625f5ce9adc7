"""Node, NodeStats and the NodeRegistry: order, uniqueness refusals, live figures kept, change listeners."""

import re

import attrs
import pytest

from blyanproxy.core import Node, NodeRegistry, NodeStats, new_node_id


def node(index, **fields):
    fields = {"base_url": f"http://10.0.0.{index}:8000", **fields}
    return Node(id=f"n{index}", name=f"node{index}", **fields)


@pytest.fixture
def events():
    return []


@pytest.fixture
def registry(events):
    found = NodeRegistry()
    found.listen(lambda event, changed: events.append((event, changed.id)))
    return found


# -- values -------------------------------------------------------------------------------

def test_new_node_ids_are_sixteen_hex_characters_and_distinct():
    ids = {new_node_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def test_a_node_carries_its_parsed_url_and_defaults():
    made = Node(id="a", name="gpü-1", base_url="https://GPU1.example.com:8443/v/")
    assert (made.url.host, made.url.port, made.url.path) == ("gpu1.example.com", 8443, "/v")
    assert made.name_bytes == "gpü-1".encode()
    assert (made.tags, made.metadata, made.weight, made.draining, made.tls_verify, made.declared_by) == (
        (), {}, 1, False, True, None)


def test_a_node_with_an_unusable_base_url_cannot_be_made():
    with pytest.raises(ValueError, match="credentials"):
        Node(id="a", name="a", base_url="http://user:pw@10.0.0.1")


def test_a_node_is_a_frozen_value():
    made = node(1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.name = "other"
    changed = attrs.evolve(made, base_url="http://10.0.0.9:1")
    assert changed.url.host == "10.0.0.9" and made.url.host == "10.0.0.1"


def test_latency_is_a_moving_average_weighting_the_newest_by_three_tenths():
    stats = NodeStats()
    assert stats.latency_ms is None
    stats.observe_latency(100.0)
    assert stats.latency_ms == 100.0
    stats.observe_latency(200.0)
    assert stats.latency_ms == pytest.approx(130.0)
    stats.observe_latency(130.0)
    assert stats.latency_ms == pytest.approx(130.0)


# -- the registry ------------------------------------------------------------------------------

def test_nodes_keep_the_order_they_were_added_in(registry, events):
    for index in (3, 1, 2):
        assert registry.add(node(index)).id == f"n{index}"
    assert [n.id for n in registry.nodes()] == ["n3", "n1", "n2"]
    assert registry.get("n1") == node(1) and registry.get("nope") is None
    assert events == [("added", "n3"), ("added", "n1"), ("added", "n2")]
    assert registry.active_id is None


def test_the_nodes_are_a_tuple_kept_until_the_registry_changes(registry):
    registry.add(node(1))
    first = registry.nodes()
    assert isinstance(first, tuple) and registry.nodes() is first  # nobody can change it; asked often, built once
    registry.add(node(2))
    assert [n.id for n in registry.nodes()] == ["n1", "n2"] and [n.id for n in first] == ["n1"]
    registry.update("n1", name="renamed")
    assert registry.nodes()[0].name == "renamed"
    registry.remove("n2")
    assert [n.id for n in registry.nodes()] == ["n1"]


@pytest.mark.parametrize("other", [
    Node(id="n1", name="again", base_url="http://10.0.0.9:8000"),
    Node(id="x", name="x", base_url="http://10.0.0.1:8000/"),
    Node(id="x", name="x", base_url="http://10.0.0.1:8000//"),
])
def test_an_id_or_base_url_already_registered_is_refused(registry, events, other):
    registry.add(node(1))
    with pytest.raises(ValueError, match="already"):
        registry.add(other)
    assert [n.id for n in registry.nodes()] == ["n1"] and events == [("added", "n1")]


def test_the_same_host_is_fine_on_another_port_or_path(registry):
    registry.add(node(1))
    registry.add(Node(id="b", name="b", base_url="http://10.0.0.1:8001"))
    registry.add(Node(id="c", name="c", base_url="http://10.0.0.1:8000/other"))
    assert len(registry.nodes()) == 3


def test_a_default_port_is_the_same_url_as_none(registry):
    registry.add(Node(id="a", name="a", base_url="http://gpu1.example.com"))
    with pytest.raises(ValueError):
        registry.add(Node(id="b", name="b", base_url="http://GPU1.example.com:80"))


def test_each_node_has_its_own_live_figures(registry):
    registry.add(node(1))
    registry.add(node(2))
    registry.stats("n1").requests = 3
    assert registry.stats("n2").requests == 0 and registry.stats("n1").requests == 3
    with pytest.raises(KeyError):
        registry.stats("nope")


def test_an_update_replaces_settings_and_keeps_place_and_figures(registry, events):
    registry.add(node(1))
    registry.add(node(2))
    registry.stats("n1").in_flight = 2
    updated = registry.update("n1", name="renamed", weight=5, tags=("a100",), draining=True,
                              base_url="http://10.0.0.7:8000")
    assert (updated.name, updated.weight, updated.tags, updated.draining) == ("renamed", 5, ("a100",), True)
    assert updated.url.host == "10.0.0.7" and registry.get("n1") == updated
    assert [n.id for n in registry.nodes()] == ["n1", "n2"] and registry.stats("n1").in_flight == 2
    assert events[-1] == ("updated", "n1")


def test_an_update_may_keep_its_own_url(registry):
    registry.add(node(1))
    assert registry.update("n1", base_url="http://10.0.0.1:8000/").id == "n1"


def test_an_update_to_a_url_taken_by_another_node_is_refused_and_changes_nothing(registry, events):
    registry.add(node(1))
    registry.add(node(2))
    with pytest.raises(ValueError, match="already used by node node2"):
        registry.update("n1", base_url="http://10.0.0.2:8000", name="renamed")
    assert registry.get("n1") == node(1) and events[-1] == ("added", "n2")


def test_an_update_of_an_unknown_node_is_a_key_error(registry):
    with pytest.raises(KeyError):
        registry.update("nope", draining=True)


def test_draining_is_a_setting_like_the_others(registry):
    registry.add(node(1))
    registry.update("n1", draining=True)
    assert registry.get("n1").draining is True
    registry.update("n1", draining=False)
    assert registry.get("n1").draining is False


def test_a_removed_node_takes_its_figures_and_url_with_it(registry, events):
    registry.add(node(1))
    registry.add(node(2))
    registry.stats("n1").requests = 7
    assert registry.remove("n1") == node(1)
    assert [n.id for n in registry.nodes()] == ["n2"] and registry.get("n1") is None
    with pytest.raises(KeyError):
        registry.stats("n1")
    registry.add(node(1))  # its URL is free again; the figures start over
    assert registry.stats("n1").requests == 0
    assert events == [("added", "n1"), ("added", "n2"), ("removed", "n1"), ("added", "n1")]


def test_removing_an_unknown_node_is_a_key_error(registry, events):
    with pytest.raises(KeyError):
        registry.remove("nope")
    assert events == []


def test_a_listener_added_while_a_change_is_announced_hears_the_next_change(registry, events):
    later = []

    def first(event, changed):
        if not later:
            registry.listen(lambda e, n: later.append((e, n.id)))
            later.append(("listening", None))

    registry.listen(first)
    registry.add(node(1))
    registry.update("n1", weight=2)
    assert events == [("added", "n1"), ("updated", "n1")]
    assert later == [("listening", None), ("updated", "n1")]
