"""Failover: the attempt machine's decisions carried out against a real Balancer, on a Clock."""

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from blyanproxy.core import (
    BAD_RESPONSE,
    CONNECT_FAILED,
    CONNECT_TIMEOUT,
    NO_RESPONSE,
    REFUSED,
    AttemptRules,
    Attempts,
    Node,
    NodeRegistry,
    parse_route,
)
from blyanproxy.fleet import Balancer
from blyanproxy.forward.failover import Failover, classify_failure
from blyanproxy.upstream import ProtocolError


class Owner:
    """The request a Failover works for: records what it is told to do."""

    def __init__(self):
        self.tries = []
        self.errors = []
        self.failed_attempts = []
        self.events = []  # the attempt events, in order
        self.abandoned = []

    def try_node(self, lease, fresh):
        self.tries.append((lease.node.name, fresh))

    def abandon(self):
        self.abandoned.append(self.tries[-1][0])

    def give_up(self, err):
        self.errors.append((err.status, err.code))

    def attempt_started(self, node, number):
        self.events.append(("started", node.name, number))

    def attempt_failed(self, node, reason):
        self.failed_attempts.append((node, reason))
        self.events.append(("failed", node, reason))

    def queue_waited(self, since):
        self.events.append(("queued", since))


def fleet(count, clock):
    registry = NodeRegistry()
    for index in range(count):
        registry.add(Node(id=f"id{index}", name=f"n{index}", base_url=f"http://10.0.0.{index + 1}:8000"))
    return registry, Balancer(registry, clock, "round-robin")


def failover(count=2, **rules):
    clock = Clock()
    registry, balancer = fleet(count, clock)
    owner = Owner()
    rules = AttemptRules(**{"max_attempts": 3, "retry_delay": 0.0, "retry_on_status": frozenset({503}),
                            "health_interval": 5.0, **rules})
    machine = Failover(Attempts(rules), balancer, parse_route(b"/v1/models"), clock, owner,
                       owner.try_node, owner.give_up, owner.abandon)
    return machine, owner, registry, clock


def in_flight(registry):
    return [registry.stats(node.id).in_flight for node in registry.nodes()]


@pytest.mark.parametrize(("exception", "expected"), [
    (error.TimeoutError(), CONNECT_TIMEOUT),
    (error.ConnectionRefusedError(), REFUSED),
    (error.DNSLookupError(), CONNECT_FAILED),
    (error.ConnectError(), CONNECT_FAILED),
    (ProtocolError("bad status line"), BAD_RESPONSE),
    (error.ConnectionDone(), NO_RESPONSE),
    (error.ConnectionLost(), NO_RESPONSE),
])
def test_connection_failures_are_classified(exception, expected):
    assert classify_failure(Failure(exception)) is expected


def test_a_failed_attempt_is_held_against_its_node_and_the_next_node_is_tried():
    machine, owner, registry, _ = failover()
    machine.start()
    assert owner.tries == [("n0", False)] and in_flight(registry) == [1, 0]
    machine.failed(REFUSED)
    assert owner.tries == [("n0", False), ("n1", False)]
    assert owner.failed_attempts == [("n0", "refused")]
    assert registry.stats("id0").last_failure == "refused" and in_flight(registry) == [0, 1]
    assert machine.count == 2 and machine.lease.node.name == "n1"


def test_the_retry_delay_runs_on_the_clock_and_the_client_leaving_cancels_it():
    machine, owner, registry, clock = failover(retry_delay=0.5)
    machine.start()
    machine.failed(CONNECT_TIMEOUT)
    assert machine.waiting and owner.tries == [("n0", False)] and in_flight(registry) == [0, 0]
    clock.advance(0.5)
    assert not machine.waiting and owner.tries == [("n0", False), ("n1", False)]

    machine, owner, _, clock = failover(retry_delay=0.5)
    machine.start()
    machine.failed(CONNECT_TIMEOUT)
    machine.cancel()
    clock.advance(1)
    assert not machine.waiting and owner.tries == [("n0", False)] and owner.errors == []


def test_with_every_node_tried_the_last_failure_is_the_answer():
    machine, owner, registry, _ = failover(count=2)
    machine.start()
    machine.failed(REFUSED)
    machine.failed(CONNECT_TIMEOUT)
    assert owner.errors == [(504, "upstream_timeout")]
    assert in_flight(registry) == [0, 0]


def test_no_usable_node_is_503():
    machine, owner, _, _ = failover(count=0)
    machine.start()
    assert owner.errors == [(503, "no_healthy_nodes")] and owner.tries == []


def test_a_stale_connection_is_retried_fresh_on_the_same_lease():
    machine, owner, registry, _ = failover()
    machine.start()
    machine.failed(NO_RESPONSE, reused=True, bytes_received=0)
    assert owner.tries == [("n0", False), ("n0", True)]
    assert owner.failed_attempts == [] and registry.stats("id0").failures == 0 and in_flight(registry) == [1, 0]


def test_a_retry_status_moves_to_another_node_or_is_relayed():
    machine, owner, registry, _ = failover()
    machine.start()
    assert machine.answered(503) is False
    assert owner.tries == [("n0", False), ("n1", False)]
    assert owner.failed_attempts == [("n0", "status_503")] and in_flight(registry) == [0, 1]
    assert machine.answered(503) is True  # no untried node is left: the answer goes to the client
    assert machine.answered(200) is True


def test_an_unusable_answer_gives_up_at_once():
    machine, owner, registry, _ = failover()
    machine.start()
    machine.unusable(BAD_RESPONSE)
    assert owner.errors == [(502, "upstream_failed")] and owner.tries == [("n0", False)]
    assert registry.stats("id0").last_failure == "bad_response" and in_flight(registry) == [0, 0]


@pytest.fixture
def debug_lines(debug_log):
    """The data path's DEBUG lines (namespace blyanproxy.proxy)."""
    return debug_log("blyanproxy.proxy")


def test_debug_tells_each_attempt_retry_and_giving_up(debug_lines):
    machine, _, _, clock = failover(count=2, retry_delay=0.25)
    machine.start()
    machine.failed(NO_RESPONSE, reused=True, bytes_received=0)
    machine.failed(REFUSED)
    clock.advance(0.25)
    machine.failed(CONNECT_TIMEOUT)
    clock.advance(0.25)  # no node is left to try
    assert debug_lines == [
        "attempt 1 on n0",
        "attempt 1 on n0 on a fresh connection (the kept-alive one was stale)",
        "failing over from n0 after refused: another node in 0.25 s, 1 tried so far",
        "attempt 2 on n1",
        "failing over from n1 after connect_timeout: another node in 0.25 s, 2 tried so far",
        "giving up after 2 attempt(s): 504 upstream_timeout",
    ]


def test_debug_tells_a_failover_on_a_retry_status(debug_lines):
    machine, _, _, _ = failover()
    machine.start()
    machine.answered(503)
    assert debug_lines == [
        "attempt 1 on n0",
        "n0 answered 503 (RETRY_ON_STATUS): another node first, if one is free",
        "attempt 2 on n1",
    ]


def test_each_attempt_is_reported_when_it_starts_and_when_it_fails_in_order():
    machine, owner, _, _ = failover(count=3)
    machine.start()
    machine.failed(NO_RESPONSE, reused=True, bytes_received=0)  # a fresh connection: the same attempt
    machine.failed(REFUSED)
    assert machine.answered(503) is False
    assert machine.answered(200) is True
    assert owner.events == [
        ("started", "n0", 1), ("failed", "n0", "refused"),
        ("started", "n1", 2), ("failed", "n1", "status_503"),
        ("started", "n2", 3),
    ]


def test_an_attempt_whose_node_goes_out_is_abandoned_and_failed_over():
    machine, owner, registry, _ = failover()
    machine.start()
    assert owner.tries == [("n0", False)]
    registry.stats("id0").taken_out("down")
    assert owner.abandoned == ["n0"] and owner.tries == [("n0", False), ("n1", False)]
    assert owner.failed_attempts == [("n0", "node_out")] and in_flight(registry) == [0, 1]
    registry.stats("id0").taken_out("down")  # the new attempt watches its own node only
    assert owner.abandoned == ["n0"]
    assert machine.answered(200)
    registry.stats("id1").taken_out("ejected")  # answered: nothing is abandoned any more
    assert owner.abandoned == ["n0"] and owner.errors == []


def test_with_no_other_node_an_abandoned_attempt_is_the_answer():
    machine, owner, registry, _ = failover(count=1)
    machine.start()
    registry.stats("id0").taken_out("ejected")
    assert owner.errors == [(502, "upstream_failed")] and in_flight(registry) == [0]


def test_a_cancelled_failover_no_longer_watches():
    machine, owner, registry, _ = failover()
    machine.start()
    machine.cancel()
    registry.stats("id0").taken_out("down")
    assert owner.abandoned == [] and owner.tries == [("n0", False)]


def queued_failover(clock, balancer, owner):
    from blyanproxy.fleet import Caller, SlotQueue

    queue = SlotQueue(clock, 10, 5.0)
    balancer.on_slot_freed = queue.slot_freed
    machine = Failover(Attempts(AttemptRules()), balancer, parse_route(b"/v1/models"), clock, owner,
                       owner.try_node, owner.give_up, owner.abandon, queue=queue, caller=Caller("key-a"))
    return machine, queue


def test_a_first_pick_with_every_node_at_its_cap_waits_for_a_slot():
    clock = Clock()
    registry, balancer = fleet(1, clock)
    balancer.default_cap = 1
    owner = Owner()
    machine, queue = queued_failover(clock, balancer, owner)
    held = balancer.acquire(parse_route(b"/v1/models"), frozenset())
    clock.advance(5)
    machine.start()
    assert machine.waiting and len(queue) == 1 and owner.tries == [] and owner.errors == []
    clock.advance(1.5)
    held.release()
    clock.advance(0)
    assert owner.tries == [("n0", False)] and not machine.waiting
    assert owner.events[0] == ("queued", 5.0)  # the wait, from when it joined, reported (the tracing hook)


def test_a_client_that_leaves_the_queue_is_never_tried():
    clock = Clock()
    registry, balancer = fleet(1, clock)
    balancer.default_cap = 1
    owner = Owner()
    machine, queue = queued_failover(clock, balancer, owner)
    held = balancer.acquire(parse_route(b"/v1/models"), frozenset())
    machine.start()
    machine.cancel()
    assert len(queue) == 0
    held.release()  # the freed slot finds nobody waiting
    clock.advance(10)
    assert owner.tries == [] and owner.errors == [] and registry.stats("id0").in_flight == 0


def test_without_caps_nothing_waits():
    clock = Clock()
    registry, balancer = fleet(1, clock)
    registry.update("id0", draining=True)
    owner = Owner()
    machine, queue = queued_failover(clock, balancer, owner)
    machine.start()
    assert len(queue) == 0 and owner.errors == [(503, "no_healthy_nodes")]
