"""Tag and index members, and keyed pools sharing each node's load across keys."""

import pytest
from twisted.internet.task import Clock

from blyanproxy.core.errors import ProxyError
from blyanproxy.core.healthstate import HealthRules
from blyanproxy.core.nodes import Node
from blyanproxy.core.routing import Route
from blyanproxy.core.selection import route_members
from blyanproxy.discovery.pools import KeyedBalancer, KeyPool

A = Node(id="a", name="a", base_url="http://10.0.0.1", tags=("small",))
B = Node(id="b", name="b", base_url="http://10.0.0.2", tags=("large", "eu"))
C = Node(id="c", name="c", base_url="http://10.0.0.3", tags=("large",))
ANY = Route(upstream_target=b"/")


@pytest.mark.parametrize(
    "route, members",
    [
        (ANY, [A, B, C]),
        (Route(b"/", tag="large"), [B, C]),
        (Route(b"/", tag="all"), [A, B, C]),
        (Route(b"/", index=1), [B]),
    ],
)
def test_route_members(route, members):
    assert list(route_members([A, B, C], route)) == members


@pytest.mark.parametrize(
    "nodes, route, code",
    [
        ([A], Route(b"/", tag="Large"), "unknown_tag"),
        ([A, B], Route(b"/", index=2), "index_out_of_range"),
        ([], Route(b"/", index=0), "no_workloads"),
    ],
)
def test_routes_naming_no_node_are_404(nodes, route, code):
    with pytest.raises(ProxyError) as raised:
        route_members(nodes, route)
    assert (raised.value.status, raised.value.code) == (404, code)


def test_in_flight_counts_a_nodes_load_from_every_key_and_ties_rotate():
    clock = Clock()
    balancer = KeyedBalancer(clock)
    first, second = KeyPool((A, B), balancer), KeyPool((B, A), balancer)
    leases = [first.acquire(ANY, frozenset()), second.acquire(ANY, frozenset()),
              first.acquire(ANY, frozenset()), second.acquire(ANY, frozenset())]
    assert sorted(lease.node.id for lease in leases) == ["a", "a", "b", "b"]
    assert balancer.stats(A).in_flight == 2 and balancer.stats(B).in_flight == 2
    for lease in leases:
        lease.release()
    assert balancer.stats(A).in_flight == 0


def test_an_ejected_node_comes_back_on_trial_after_its_cooldown():
    clock = Clock()
    balancer = KeyedBalancer(clock, rules=HealthRules(eject_after=1, cooldown=10))
    pool = KeyPool((A,), balancer)
    pool.acquire(ANY, frozenset()).failed("refused")
    assert pool.acquire(ANY, frozenset()) is None
    clock.advance(10)
    lease = pool.acquire(ANY, frozenset())
    assert lease is not None and lease.node is A
    lease.failed("refused")  # failing again: out for twice as long
    clock.advance(10)
    assert pool.acquire(ANY, frozenset()) is None
    clock.advance(10)
    assert pool.acquire(ANY, frozenset()) is not None


def test_figures_of_nodes_no_key_lists_are_pruned_unless_in_flight():
    balancer = KeyedBalancer(Clock())
    pool = KeyPool((A, B, C), balancer)
    held = pool.acquire(Route(b"/", index=0), frozenset())
    for index in (1, 2):
        pool.acquire(Route(b"/", index=index), frozenset()).release()
    balancer.prune(frozenset({C.base_url}))
    # Forgotten figures start again from nothing; kept ones still count what happened.
    assert [balancer.stats(node).requests for node in (A, B, C)] == [1, 0, 1]
    held.release()
    balancer.prune(frozenset())
    assert [balancer.stats(node).requests for node in (A, B, C)] == [0, 0, 0]
