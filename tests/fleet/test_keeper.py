"""FleetKeeper: edits through a store, lost races worked out again, remote fleets applied by difference."""

import attrs
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from blyanproxy.core.fleetedit import (
    add_node,
    remove_node,
    set_active,
    set_policy,
    update_node,
)
from blyanproxy.core.fleetstate import FleetState, StoreConflict, StoreUnavailable
from blyanproxy.core.nodes import Node, NodeRegistry
from blyanproxy.fleet.balancer import Balancer
from blyanproxy.fleet.keeper import EDIT_ATTEMPTS, FleetKeeper
from blyanproxy.store.jsonfile import MemoryStore


def node(index, **fields):
    fields = {"id": f"n{index}", **fields}
    return Node(name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


class RacingStore(MemoryStore):
    """A store where another process wins the first ``losses`` writes by adding ``theirs``."""

    def __init__(self, losses, theirs):
        self.losses = losses
        self.theirs = theirs
        self.held = FleetState()
        self.commits = 0

    def commit(self, wanted):
        self.commits += 1
        if self.losses:
            self.losses -= 1
            self.held = attrs.evolve(self.held, nodes=self.held.nodes + (self.theirs.pop(0),))
            return fail(StoreConflict(self.held))
        self.held = wanted
        return succeed(wanted)


def keeper_with(store=None, nodes=()):
    registry = NodeRegistry()
    keeper = FleetKeeper(registry, Balancer(registry, Clock(), "active-first"), store or MemoryStore())
    keeper.restore(nodes)
    return keeper, registry


def result(deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0]


def test_a_lost_race_is_worked_out_again_on_the_fresh_fleet():
    store = RacingStore(2, [node(8), node(9)])
    keeper, registry = keeper_with(store)
    result(keeper.edit(add_node(node(1))))
    assert [n.id for n in registry.nodes()] == ["n8", "n9", "n1"]
    assert store.held.nodes == tuple(registry.nodes()) and store.commits == 3


def test_a_change_that_no_longer_fits_the_fresh_fleet_is_refused():
    store = RacingStore(1, [node(1, id="theirs")])  # they added the same URL first
    keeper, registry = keeper_with(store)
    refused = result(keeper.edit(add_node(node(1))))
    assert isinstance(refused.value, ValueError) and [n.id for n in registry.nodes()] == ["theirs"]


def test_endless_races_end_in_a_conflict():
    store = RacingStore(EDIT_ATTEMPTS, [node(10 + i) for i in range(EDIT_ATTEMPTS)])
    keeper, _ = keeper_with(store)
    assert isinstance(result(keeper.edit(set_policy("round-robin"))).value, StoreConflict)


def test_a_refused_write_changes_nothing():
    class Down(MemoryStore):
        def commit(self, wanted):
            return fail(StoreUnavailable("etcd is unreachable"))

    keeper, registry = keeper_with(Down(), [node(1)])
    assert isinstance(result(keeper.edit(remove_node("n1"))).value, StoreUnavailable)
    assert [n.id for n in registry.nodes()] == ["n1"]


def test_applying_a_remote_fleet_keeps_live_figures_of_nodes_that_stay():
    keeper, registry = keeper_with(None, [node(1), node(2)])
    registry.stats("n1").requests = 5
    keeper.apply(FleetState(nodes=(node(1, weight=3), node(3)), active_id="n3", policy="least-latency"))
    assert [n.id for n in registry.nodes()] == ["n1", "n3"]
    assert registry.get("n1").weight == 3 and registry.stats("n1").requests == 5
    assert registry.active_id == "n3" and keeper.snapshot().policy == "least-latency"
    keeper.apply(FleetState(nodes=(node(1, weight=3),)))
    assert registry.active_id is None  # back to the configured policy, no active node
    assert keeper.snapshot().policy is None


def test_edits():
    keeper, registry = keeper_with(None, [node(1, declared_by="NODE_1"), node(2)])
    result(keeper.edit(set_active("n1")))
    result(keeper.edit(update_node("n2", tags=("a100",))))
    result(keeper.edit(remove_node("n1")))
    state = keeper.snapshot()
    assert state.active_id is None and state.removed == ("http://10.0.0.1:8000",)
    assert registry.get("n2").tags == ("a100",)
    result(keeper.edit(add_node(node(1, id="again"))))
    assert keeper.snapshot().removed == ()
    assert isinstance(result(keeper.edit(update_node("n2", base_url="http://10.0.0.1:8000"))).value, ValueError)
    assert isinstance(result(keeper.edit(set_active("nope"))).value, KeyError)
