"""Caps in the balancer and the slot queue: who gets a freed slot, timeouts, leaving, closing."""

from twisted.internet.task import Clock

from blyanproxy.core import HealthRules, Node, NodeRegistry, parse_route
from blyanproxy.fleet import Balancer, Caller, SlotQueue

NONE = frozenset()


def node(index, **fields):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


class Figures:
    """A queue observer that keeps what it is told."""

    def __init__(self):
        self.left = []
        self.rejected = []

    def queue_left(self, seconds, outcome):
        self.left.append((seconds, outcome))

    def queue_rejected(self, reason):
        self.rejected.append(reason)


def setup(*nodes, limit=10, timeout=5.0, default_cap=None):
    clock = Clock()
    registry = NodeRegistry()
    for each in nodes:
        registry.add(each)
    balancer = Balancer(registry, clock, "round-robin", HealthRules())
    balancer.default_cap = default_cap
    figures = Figures()
    queue = SlotQueue(clock, limit, timeout, figures)
    balancer.on_slot_freed = queue.slot_freed
    return clock, registry, balancer, queue, figures


class Outcome:
    def __init__(self):
        self.lease = None
        self.error = None

    def granted(self, lease):
        self.lease = lease

    def refused(self, error):
        self.error = error


def wait(queue, balancer, key, route=b"/v1/chat/completions", band="normal", excluded=NONE):
    outcome = Outcome()
    ticket = queue.wait(balancer, parse_route(route), excluded, Caller(key, band), outcome.granted, outcome.refused)
    return ticket, outcome


def test_a_node_at_its_cap_is_no_candidate():
    clock, registry, balancer, queue, _ = setup(node(1, max_inflight=1), node(2), default_cap=2)
    route = parse_route(b"/v1/models")
    leases = [balancer.acquire(route, NONE) for _ in range(3)]
    assert sorted(lease.node.id for lease in leases) == ["n1", "n2", "n2"]
    assert balancer.acquire(route, NONE) is None
    assert balancer.at_cap(route, NONE)
    assert not balancer.at_cap(route, frozenset({"n1", "n2"}))  # nobody left to wait for
    leases[0].release()
    assert not balancer.at_cap(route, NONE)


def test_a_freed_slot_goes_to_the_waiter_on_the_next_turn():
    clock, registry, balancer, queue, figures = setup(node(1, max_inflight=1))
    held = balancer.acquire(parse_route(b"/v1/models"), NONE)
    _, outcome = wait(queue, balancer, "a")
    assert len(queue) == 1
    clock.advance(1.5)
    held.release()
    assert len(queue) == 0 and outcome.lease is None  # reserved now, handed over next
    assert registry.stats("n1").in_flight == 1
    clock.advance(0)
    assert outcome.lease is not None and outcome.lease.node.id == "n1"
    assert figures.left == [(1.5, "served")]


def test_the_waiters_route_still_holds():
    clock, registry, balancer, queue, _ = setup(node(1, max_inflight=1), node(2, max_inflight=1, tags=("big",)))
    first = balancer.acquire(parse_route(b"/v1/models"), NONE)
    second = balancer.acquire(parse_route(b"/v1/models"), NONE)
    big = first if first.node.id == "n2" else second
    small = second if big is first else first
    _, on_big = wait(queue, balancer, "a", route=b"/tags/big/v1/chat/completions")
    small.release()  # a slot on n1 is no use to a request for tag big
    clock.advance(0)
    assert on_big.lease is None and len(queue) == 1
    big.release()
    clock.advance(0)
    assert on_big.lease.node.id == "n2"


def test_a_draining_nodes_slot_is_never_handed_out():
    clock, registry, balancer, queue, _ = setup(node(1, max_inflight=1))
    held = balancer.acquire(parse_route(b"/v1/models"), NONE)
    _, outcome = wait(queue, balancer, "a")
    registry.update("n1", draining=True)
    held.release()
    clock.advance(0)
    assert outcome.lease is None and len(queue) == 1


def test_full_timeout_leave_and_close():
    clock, registry, balancer, queue, figures = setup(node(1, max_inflight=1), limit=2, timeout=5.0)
    held = balancer.acquire(parse_route(b"/v1/models"), NONE)
    leaver, _ = wait(queue, balancer, "a")
    _, late = wait(queue, balancer, "b")
    ticket, full = wait(queue, balancer, "c")
    assert ticket is None and full.error.status == 429 and full.error.code == "queue_full"
    assert full.error.retry_after == 5  # no slot freed yet: the queue timeout
    leaver.leave()
    assert len(queue) == 1
    clock.advance(5.0)
    assert late.error.status == 503 and late.error.code == "queue_timeout" and late.error.retry_after >= 1
    assert [outcome for _, outcome in figures.left] == ["gone", "timeout"]
    assert figures.rejected == ["queue_full", "queue_timeout"]
    _, closing = wait(queue, balancer, "d")
    queue.close()
    assert closing.error.status == 503 and len(queue) == 0
    _, after = wait(queue, balancer, "e")
    assert after.error.status == 503  # closed: nobody waits any more
    held.release()


def test_leaving_during_the_handover_gives_the_slot_back():
    clock, registry, balancer, queue, _ = setup(node(1, max_inflight=1))
    held = balancer.acquire(parse_route(b"/v1/models"), NONE)
    ticket, outcome = wait(queue, balancer, "a")
    _, next_one = wait(queue, balancer, "b")
    held.release()  # reserved for a
    ticket.leave()  # a leaves before the handover: the slot goes on to b
    clock.advance(0)
    assert outcome.lease is None
    assert next_one.lease is not None and registry.stats("n1").in_flight == 1


def test_retry_after_follows_the_rate_slots_free_at():
    clock, registry, balancer, queue, _ = setup(node(1, max_inflight=1), timeout=30.0)
    for _ in range(10):
        lease = balancer.acquire(parse_route(b"/v1/models"), NONE)
        clock.advance(0.5)
        lease.release()
    assert queue.retry_after(ahead=3) == 2  # two a second: four slots in two seconds
