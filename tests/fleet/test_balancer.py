"""The Balancer: leases counted in flight, what an attempt reports, policies, affinity and route filtering."""

import pytest
from twisted.internet.task import Clock

from blyanproxy.core import HealthRules, Node, NodeRegistry, ProxyError, Route, after_probe, parse_route
from blyanproxy.fleet import Balancer, LeaseMaker

RULES = HealthRules(eject_after=3, cooldown=10.0, cooldown_cap=300.0)
NONE = frozenset()


def node(index, **fields):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


def fleet(*nodes, policy="active-first"):
    clock = Clock()
    registry = NodeRegistry()
    for each in nodes:
        registry.add(each)
    return clock, registry, Balancer(registry, clock, policy, RULES)


def route(target=b"/v1/models"):
    return parse_route(target)


def picks(balancer, count, target=b"/v1/models", release=True):
    """The node ids of ``count`` acquisitions (each released at once unless told otherwise)."""
    chosen = []
    for _ in range(count):
        lease = balancer.acquire(route(target), NONE)
        chosen.append(lease.node.id)
        if release:
            lease.release()
    return chosen


# -- leases --------------------------------------------------------------------------------

def test_a_lease_counts_its_node_in_flight_until_released_once():
    _, registry, balancer = fleet(node(1))
    first = balancer.acquire(route(), NONE)
    second = balancer.acquire(route(), NONE)
    stats = registry.stats("n1")
    assert (first.node.id, stats.in_flight, stats.requests) == ("n1", 2, 2)
    first.release()
    first.release()  # idempotent
    assert (stats.in_flight, first.released, second.released) == (1, True, False)
    second.release()
    assert (stats.in_flight, stats.requests) == (0, 2)


def test_a_burst_sees_each_others_choices():
    _, registry, balancer = fleet(node(1), node(2), node(3), policy="least-inflight")
    leases = [balancer.acquire(route(), NONE) for _ in range(6)]
    assert sorted(lease.node.id for lease in leases) == ["n1", "n1", "n2", "n2", "n3", "n3"]
    assert [registry.stats(f"n{i}").in_flight for i in (1, 2, 3)] == [2, 2, 2]


def test_a_lease_outlives_the_removal_of_its_node():
    _, registry, balancer = fleet(node(1))
    lease = balancer.acquire(route(), NONE)
    registry.remove("n1")
    lease.failed("refused")  # reporting on a node gone meanwhile is harmless
    assert lease.released and lease.stats.in_flight == 0
    assert balancer.acquire(route(), NONE) is None and balancer.is_empty()


def test_a_failed_attempt_counts_against_its_node_and_releases_the_lease():
    _, registry, balancer = fleet(node(1), node(2))
    lease = balancer.acquire(route(), NONE)
    lease.failed("timeout")
    stats = registry.stats("n1")
    assert lease.released and stats.in_flight == 0
    assert (stats.failures, stats.consecutive_failures, stats.last_failure) == (1, 1, "timeout")
    assert balancer.acquire(route(), NONE).node.id == "n1"  # one failure does not eject


def test_a_run_of_failures_ejects_the_node_for_the_cooldown():
    clock, registry, balancer = fleet(node(1), node(2))
    for _ in range(3):
        balancer.acquire(route(), NONE).failed("reset")
    health = registry.stats("n1").health
    assert (health.ejected_until, health.eject_reason) == (10.0, "reset")
    assert picks(balancer, 3) == ["n2", "n2", "n2"]
    clock.advance(10)
    assert picks(balancer, 1) == ["n2"]  # probed nodes come back only after a passing probe
    stats = registry.stats("n1")
    stats.health = after_probe(stats.health, True, clock.seconds(), RULES)
    assert picks(balancer, 1) == ["n1"]


def test_a_refused_connection_ejects_at_once():
    _, registry, balancer = fleet(node(1), node(2))
    balancer.acquire(route(), NONE).failed("refused")
    assert registry.stats("n1").health.eject_reason == "refused"
    assert picks(balancer, 2) == ["n2", "n2"]


def test_a_response_clears_the_run_of_failures_and_feeds_the_latency():
    _, registry, balancer = fleet(node(1), node(2))
    for _ in range(2):
        balancer.acquire(route(), NONE).failed("timeout")
    answered = balancer.acquire(route(), NONE)
    answered.responded(0.25)
    stats = registry.stats("n1")
    assert (stats.consecutive_failures, stats.latency_ms, stats.in_flight) == (0, 250.0, 1)
    assert not answered.released  # the body is still to come
    answered.release()
    for _ in range(2):
        balancer.acquire(route(), NONE).failed("timeout")
    assert picks(balancer, 1) == ["n1"]  # two, one answer, two: never three in a row
    balancer.acquire(route(), NONE).responded(0.35)
    assert stats.latency_ms == pytest.approx(280.0)  # a moving average: 250 + 0.3 × (350 − 250)


def test_nothing_is_leased_when_no_node_is_usable():
    _, registry, balancer = fleet(node(1, draining=True), node(2))
    stats = registry.stats("n2")
    stats.health = after_probe(stats.health, False, 0.0, RULES)
    assert balancer.acquire(route(), NONE) is None
    assert [registry.stats(n).requests for n in ("n1", "n2")] == [0, 0]
    assert not balancer.is_empty()


def test_excluded_nodes_are_passed_over():
    _, _, balancer = fleet(node(1), node(2))
    assert balancer.acquire(route(), frozenset({"n1"})).node.id == "n2"
    assert balancer.acquire(route(), frozenset({"n1", "n2"})) is None


def test_an_empty_registry():
    _, _, balancer = fleet()
    assert balancer.is_empty() and balancer.acquire(route(), NONE) is None


# -- policies ------------------------------------------------------------------------------

def test_active_first_prefers_the_active_node():
    _, registry, balancer = fleet(node(1), node(2))
    assert picks(balancer, 2) == ["n1", "n1"]
    registry.active_id = "n2"
    assert picks(balancer, 2) == ["n2", "n2"]
    registry.update("n2", draining=True)
    assert picks(balancer, 1) == ["n1"]


def test_the_policy_can_change_at_run_time():
    _, registry, balancer = fleet(node(1), node(2, weight=2))
    assert balancer.policy == "active-first" and picks(balancer, 3) == ["n1", "n1", "n1"]
    balancer.policy = "round-robin"
    assert balancer.policy == "round-robin"
    assert sorted(picks(balancer, 3)) == ["n1", "n2", "n2"]  # weighted: two of every three go to n2
    balancer.policy = "least-latency"
    registry.stats("n1").observe_latency(50.0)
    registry.stats("n2").observe_latency(20.0)
    assert picks(balancer, 2) == ["n2", "n2"]


def test_an_unknown_policy_is_refused_and_the_old_one_kept():
    _, _, balancer = fleet(node(1), policy="round-robin")
    with pytest.raises(KeyError):
        balancer.policy = "fastest"
    assert balancer.policy == "round-robin"


# -- affinity -------------------------------------------------------------------------------

def affine(key):
    return Route(upstream_target=b"/v1/chat/completions", affinity_key=key)


def test_an_affinity_key_keeps_to_one_node_whatever_the_policy():
    _, _, balancer = fleet(*(node(i) for i in range(1, 6)), policy="round-robin")
    homes = {}
    for key in (b"user-1", b"user-2", b"user-3", b"user-4"):
        chosen = set()
        for _ in range(5):
            lease = balancer.acquire(affine(key), NONE)
            chosen.add(lease.node.id)
            lease.release()
        assert len(chosen) == 1, key
        homes[key] = chosen.pop()
    assert len(set(homes.values())) > 1  # keys are spread over the nodes


def test_an_affinity_key_moves_only_when_its_node_cannot_take_it():
    _, registry, balancer = fleet(node(1), node(2), node(3))
    home = balancer.acquire(affine(b"user-1"), NONE)
    home.release()
    moved = balancer.acquire(affine(b"user-1"), frozenset({home.node.id}))
    assert moved.node.id != home.node.id
    moved.release()
    assert balancer.acquire(affine(b"user-1"), NONE).node.id == home.node.id


def test_a_home_node_keeps_its_key_at_low_load_and_passes_it_on_beyond_the_bound():
    _, registry, balancer = fleet(node(1), node(2), node(3))
    first = [balancer.acquire(affine(b"user-1"), NONE) for _ in range(8)]
    home = first[0].node.id
    assert {lease.node.id for lease in first} == {home}  # below 8 in flight a node keeps its keys
    more = [balancer.acquire(affine(b"user-1"), NONE) for _ in range(13)]
    assert {lease.node.id for lease in more} != {home}
    assert registry.stats(home).in_flight <= 9  # 1.25 × 21 / 3 nodes, rounded up


# -- routes ---------------------------------------------------------------------------------

def test_a_tag_route_uses_only_the_tagged_nodes():
    _, _, balancer = fleet(node(1), node(2, tags=("a100",)), node(3, tags=("a100", "big")),
                           policy="round-robin")
    assert sorted(picks(balancer, 4, b"/tags/a100/v1/models")) == ["n2", "n2", "n3", "n3"]
    assert picks(balancer, 2, b"/tags/big/v1/models") == ["n3", "n3"]
    assert sorted(picks(balancer, 3, b"/tags/all/v1/models")) == ["n1", "n2", "n3"]


def test_an_index_route_counts_the_nodes_not_draining():
    _, _, balancer = fleet(node(1), node(2, draining=True), node(3))
    assert picks(balancer, 1, b"/0/v1/models") == ["n1"]
    assert picks(balancer, 1, b"/1/v1/models") == ["n3"]


@pytest.mark.parametrize("target, code", [(b"/tags/h100/v1/models", "unknown_tag"),
                                          (b"/2/v1/models", "index_out_of_range")])
def test_a_route_naming_no_node_is_a_404_and_leases_nothing(target, code):
    _, _, balancer = fleet(node(1), node(2))
    with pytest.raises(ProxyError) as refused:
        balancer.check(route(target))
    assert (refused.value.status, refused.value.code) == (404, code)
    assert balancer.acquire(route(target), NONE) is None


def test_a_route_naming_a_node_that_exists_passes_the_check_even_if_unusable():
    _, registry, balancer = fleet(node(1, tags=("a100",)))
    stats = registry.stats("n1")
    stats.health = after_probe(stats.health, False, 0.0, RULES)
    balancer.check(route(b"/tags/a100/x"))
    balancer.check(route(b"/0/x"))
    balancer.check(route(b"/x"))
    assert balancer.acquire(route(b"/tags/a100/x"), NONE) is None


@pytest.mark.parametrize("choice", ["n2", "node2"])
def test_api_chooses_one_registered_node_by_id_or_name(choice):
    _, _, balancer = fleet(node(1), node(2), policy="round-robin")
    target = f"/v1/models?api={choice}".encode()
    assert balancer.serves(route(target))
    assert picks(balancer, 3, target) == ["n2", "n2", "n2"]
    assert balancer.acquire(route(target), frozenset({"n2"})) is None


def test_api_naming_no_registered_node_is_not_served():
    _, registry, balancer = fleet(node(1))
    assert not balancer.serves(route(b"/v1/models?api=elsewhere"))
    assert balancer.acquire(route(b"/v1/models?api=elsewhere"), NONE) is None
    assert balancer.serves(route(b"/v1/models"))
    registry.update("n1", draining=True)
    assert balancer.serves(route(b"/v1/models?api=n1"))  # known, if not usable now


# -- the pool without probes ------------------------------------------------------------------

def test_nodes_nobody_probes_come_back_after_the_cooldown():
    clock = Clock()
    maker = LeaseMaker(clock, RULES, 1.25)
    registry = NodeRegistry()
    registry.add(node(1))
    members = registry.nodes()

    def lease(unprobed):
        return maker.lease_among(members, route(), NONE, lambda n: registry.stats(n.id),
                                 lambda candidates, turn, active: candidates[0], unprobed=unprobed)

    lease(True).failed("refused")
    assert lease(True) is None
    clock.advance(10)
    assert lease(False) is None  # a probed pool waits for the probe
    readmitted = lease(True)
    assert readmitted.node.id == "n1"
    readmitted.failed("refused")
    assert registry.stats("n1").health.ejected_until == clock.seconds() + 20  # twice as long this time


# -- model routing -------------------------------------------------------------------------

def model_route(model, target=b"/v1/chat/completions"):
    import attrs

    return attrs.evolve(parse_route(target), model=model)


def test_a_model_goes_to_the_nodes_known_to_serve_it_and_unknown_ones_only_without_them():
    clock, registry, balancer = fleet(node(1, models=("a",)), node(2), node(3), policy="round-robin")
    registry.stats("n3").models = ("a", "b")
    assert sorted({balancer.acquire(model_route("a"), NONE).node.id for _ in range(6)}) == ["n1", "n3"]
    assert {balancer.acquire(model_route("c"), NONE).node.id for _ in range(3)} == {"n2"}  # n2's list: not known
    assert balancer.acquire(model_route("a"), frozenset({"n1", "n3"})).node.id == "n2"  # failover to an unknown
    registry.stats("n2").models = ()
    with pytest.raises(ProxyError) as missing:
        balancer.check(model_route("c"))
    assert (missing.value.status, missing.value.code) == (404, "model_not_found") and "'c'" in missing.value.message
    balancer.check(model_route("b"))


def test_a_model_served_only_by_unusable_nodes_is_no_node_now_not_unknown():
    clock, registry, balancer = fleet(node(1, models=("a",)), node(2, models=("b",)))
    stats = registry.stats("n1")
    stats.health = after_probe(stats.health, False, clock.seconds(), RULES)
    balancer.check(model_route("a"))  # served, just not now: the attempt machine answers 503
    assert balancer.acquire(model_route("a"), NONE) is None
    assert balancer.acquire(model_route("b"), NONE).node.id == "n2"


def test_the_listing_is_the_usable_nodes_of_the_route():
    clock, registry, balancer = fleet(node(1, tags=("gpu",)), node(2), node(3, tags=("gpu",)))
    stats = registry.stats("n3")
    stats.health = after_probe(stats.health, False, clock.seconds(), RULES)
    assert [n.id for n, _ in balancer.listing(parse_route(b"/tags/gpu/v1/models"))] == ["n1"]
    assert [n.id for n, _ in balancer.listing(parse_route(b"/v1/models"))] == ["n1", "n2"]
    assert balancer.listing(parse_route(b"/tags/none/v1/models")) == []


def test_a_model_served_only_by_a_draining_node_is_unavailable_not_unknown():
    clock, registry, balancer = fleet(node(1, models=("a",), draining=True), node(2, models=("b",)))
    balancer.check(model_route("a"))
    assert balancer.acquire(model_route("a"), NONE) is None
    with pytest.raises(ProxyError):
        balancer.check(model_route("c"))


# -- DEBUG lines ---------------------------------------------------------------------------

@pytest.fixture
def debug_lines(debug_log):
    """The balancer's DEBUG lines (namespace blyanproxy.balancer)."""
    return debug_log("blyanproxy.balancer")


def test_debug_tells_each_routing_decision_and_why_nodes_were_passed_over(debug_lines):
    clock, registry, balancer = fleet(node(1), node(2), node(3), node(4), policy="least-inflight")
    registry.stats("n2").health = after_probe(registry.stats("n2").health, False, 0.0, RULES)
    third = balancer.acquire(route(), frozenset({"n1", "n4"}))
    assert third.node.id == "n3"
    third.failed("refused")  # a refused connection ejects at once
    registry.stats("n4").latency_ms = 12.34
    lease = balancer.acquire(route(b"/v1/chat/completions?key=secret"), frozenset({"n1"}))
    assert lease.node.id == "n4"
    assert debug_lines[-1] == (
        "route /v1/chat/completions: node4 chosen by policy least-inflight among "
        "node4 (0 in flight, 12.3 ms, weight 1); "
        "not usable: node1 (tried), node2 (down), node3 (ejected for 10.0 s after refused)"
    )
    assert balancer.acquire(route(), frozenset({"n1", "n4"})) is None
    assert debug_lines[-1] == (
        "route /v1/models: no usable node; not usable: node1 (tried), node2 (down), "
        "node3 (ejected for 10.0 s after refused), node4 (tried)"
    )
    clock.advance(11)
    assert balancer.acquire(route(), frozenset({"n1", "n4"})) is None
    assert debug_lines[-1].endswith("node3 (ejected, waiting for a passing probe), node4 (tried)")


def test_debug_names_the_affinity_key_as_the_reason(debug_lines):
    _, _, balancer = fleet(node(1), node(2))
    balancer.acquire(Route(b"/v1/models", affinity_key=b"ticket-7"), NONE)
    assert " chosen by affinity key (rendezvous hash) among node1 (0 in flight, no latency yet, weight 1), " \
           "node2 (0 in flight, no latency yet, weight 1); not usable: none" in debug_lines[-1]


def test_no_debug_line_is_built_at_info():
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        _, _, balancer = fleet(node(1))
        balancer.acquire(route(), NONE)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert not [event for event in seen if event.get("log_namespace") == "blyanproxy.balancer"]


def test_an_ejection_tells_whoever_watches_the_node_once():
    _, registry, balancer = fleet(node(1), node(2))
    told = []
    stop = registry.stats("n1").watch_out(told.append)
    balancer.acquire(route(), NONE).failed("reset")
    assert told == []  # one failure does not eject
    balancer.acquire(route(), NONE).failed("refused")
    assert told == ["ejected"]
    stop()
    registry.stats("n1").health = after_probe(registry.stats("n1").health, True, 100.0, RULES)
    balancer.acquire(route(), NONE)  # (the cooldown is not over: n2)
    assert told == ["ejected"]
