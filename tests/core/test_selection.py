"""Selection policies (pure) and the Balancer that applies them, property-tested."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from blyanproxy.core.nodes import Node, NodeRegistry
from blyanproxy.core.routing import Route
from blyanproxy.core.selection import (
    POLICIES,
    Candidate,
    Turn,
    active_first,
    least_inflight,
    least_latency,
    round_robin,
)
from blyanproxy.fleet.balancer import Balancer

ROUTE = Route(upstream_target=b"/")


def node(index, weight=1, draining=False):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000",
                weight=weight, draining=draining)


def candidates(count, **kwargs):
    return [Candidate(node(i), **kwargs) for i in range(count)]


def test_active_first_prefers_the_active_node_then_registry_order():
    pool = candidates(3)
    assert active_first(pool, Turn(), "n1").node.id == "n1"
    assert active_first(pool, Turn(), "gone").node.id == "n0"
    assert active_first(pool, Turn(), None).node.id == "n0"


def test_least_latency_tries_unmeasured_nodes_then_the_fastest():
    pool = [Candidate(node(0), latency_ms=50.0), Candidate(node(1), latency_ms=None),
            Candidate(node(2), latency_ms=20.0)]
    assert least_latency(pool, Turn(), None).node.id == "n1"
    pool[1] = Candidate(node(1), latency_ms=80.0)
    assert least_latency(pool, Turn(), None).node.id == "n2"


@given(st.integers(1, 8), st.integers(1, 20))
def test_round_robin_and_least_inflight_spread_equal_nodes_evenly(count, cycles):
    for policy in (round_robin, least_inflight):
        turn = Turn()
        pool = candidates(count)
        picks = Counter(policy(pool, turn, None).node.id for _ in range(count * cycles))
        assert set(picks.values()) == {cycles}, policy.__name__


@given(st.lists(st.integers(1, 10), min_size=1, max_size=6), st.integers(1, 5))
def test_round_robin_gives_each_node_its_weight_per_cycle(weights, cycles):
    pool = [Candidate(node(i, weight=w)) for i, w in enumerate(weights)]
    turn = Turn()
    picks = Counter(round_robin(pool, turn, None).node.id for _ in range(sum(weights) * cycles))
    assert picks == Counter({f"n{i}": w * cycles for i, w in enumerate(weights)})


def test_round_robin_spreads_a_heavy_node_out():
    pool = [Candidate(node(0, weight=3)), Candidate(node(1)), Candidate(node(2))]
    turn = Turn()
    order = [round_robin(pool, turn, None).node.id for _ in range(5)]
    assert order == ["n0", "n1", "n0", "n2", "n0"]


def test_least_inflight_picks_the_least_busy():
    pool = [Candidate(node(0), in_flight=3), Candidate(node(1), in_flight=1), Candidate(node(2), in_flight=2)]
    assert least_inflight(pool, Turn(), None).node.id == "n1"


@given(
    st.sampled_from(sorted(POLICIES)),
    st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=0, max_size=6),
    st.sets(st.integers(0, 5)),
    st.integers(1, 30),
)
def test_balancer_never_picks_a_draining_or_excluded_node(policy, specs, excluded_indexes, picks):
    registry = NodeRegistry()
    for index, (weight, draining) in enumerate(specs):
        registry.add(node(index, weight=weight, draining=draining))
    balancer = Balancer(registry, Clock(), policy)
    excluded = frozenset(f"n{i}" for i in excluded_indexes)
    allowed = {f"n{i}" for i, (_, draining) in enumerate(specs) if not draining} - excluded
    for _ in range(picks):
        lease = balancer.acquire(ROUTE, excluded)
        if not allowed:
            assert lease is None
            continue
        assert lease.node.id in allowed
        lease.release()
    assert all(registry.stats(n.id).in_flight == 0 for n in registry.nodes())


def test_balancer_counts_in_flight_with_the_choice_so_a_burst_spreads():
    registry = NodeRegistry()
    for index in range(3):
        registry.add(node(index))
    balancer = Balancer(registry, Clock(), "least-inflight")
    leases = [balancer.acquire(ROUTE, frozenset()) for _ in range(6)]
    assert Counter(lease.node.id for lease in leases) == Counter({"n0": 2, "n1": 2, "n2": 2})


def test_policy_changes_at_run_time_and_unknown_names_are_refused():
    balancer = Balancer(NodeRegistry(), Clock(), "active-first")
    balancer.policy = "round-robin"
    assert balancer.policy == "round-robin"
    with pytest.raises(KeyError):
        balancer.policy = "fastest"
    assert balancer.policy == "round-robin"
