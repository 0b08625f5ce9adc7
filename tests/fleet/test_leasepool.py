"""The ``LeasePool`` seam: the registry's ``Balancer`` and a key's ``KeyPool`` keep one contract."""

import pytest
from twisted.internet.task import Clock

from blyanproxy.core.errors import ProxyError
from blyanproxy.core.nodes import Node, NodeRegistry
from blyanproxy.core.routing import Route
from blyanproxy.discovery.pools import KeyedBalancer, KeyPool
from blyanproxy.fleet import Balancer, Lease, LeasePool

NODES = (
    Node(id="a", name="a", base_url="http://10.0.0.1", tags=("small",)),
    Node(id="b", name="b", base_url="http://10.0.0.2", tags=("large",)),
)
ANY = Route(upstream_target=b"/")


def registry_balancer():
    registry = NodeRegistry()
    for node in NODES:
        registry.add(node)
    return Balancer(registry, Clock(), policy="round-robin")


def key_pool():
    return KeyPool(NODES, KeyedBalancer(Clock(), policy="round-robin"))


@pytest.fixture(params=[registry_balancer, key_pool], ids=["Balancer", "KeyPool"])
def pool(request):
    return request.param()


def test_both_pools_are_lease_pools(pool):
    assert isinstance(pool, LeasePool)


def test_acquire_leases_a_node_not_excluded_until_none_is_left(pool):
    first = pool.acquire(ANY, frozenset())
    assert isinstance(first, Lease)
    second = pool.acquire(ANY, frozenset({first.node.id}))
    assert second is not None and second.node.id != first.node.id
    assert pool.acquire(ANY, frozenset(node.id for node in NODES)) is None
    first.release()
    second.release()


def test_a_route_narrows_the_choice(pool):
    for _ in range(3):
        lease = pool.acquire(Route(b"/", tag="large"), frozenset())
        assert lease.node.id == "b"
        lease.release()
    assert pool.acquire(Route(b"/", tag="large"), frozenset({"b"})) is None


def test_check_refuses_a_route_naming_no_node_and_passes_the_rest(pool):
    pool.check(ANY)
    pool.check(Route(b"/", tag="small"))
    with pytest.raises(ProxyError) as caught:
        pool.check(Route(b"/", tag="medium"))
    assert (caught.value.status, caught.value.code) == (404, "unknown_tag")
    with pytest.raises(ProxyError) as caught:
        pool.check(Route(b"/", index=2))
    assert caught.value.status == 404


def test_a_lease_failing_counts_against_its_node_in_the_pool(pool):
    lease = pool.acquire(Route(b"/", index=0), frozenset())
    lease.failed("refused")  # a refused connection ejects the node at once
    assert pool.acquire(Route(b"/", index=0), frozenset()) is None
    assert pool.acquire(ANY, frozenset()).node.id == "b"
