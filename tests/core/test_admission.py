"""The pure admission logic: caps, the fair queue's order, aging, bounds and the Retry-After estimate."""

from twisted.internet.task import Clock

from blyanproxy.core.admission import FairQueue, SlotRate, at_cap, node_cap, parse_priority


def test_cap_rule():
    assert node_cap(None, None) is None
    assert node_cap(None, 4) == 4
    assert node_cap(2, 4) == 2
    assert not at_cap(100, None)
    assert not at_cap(1, 2)
    assert at_cap(2, 2)


def test_priority_header():
    assert parse_priority(None) == "normal"
    assert parse_priority(b" HIGH ") == "high"
    assert parse_priority(b"low") == "low"
    assert parse_priority(b"urgent!") == "normal"


def serve_all(queue: FairQueue, clock: Clock) -> list[str]:
    order = []
    while len(queue):
        first = queue.in_order(clock.seconds())[0]
        queue.served(first)
        order.append(first.item)
    return order


def test_round_robin_between_keys_fifo_within_one():
    clock = Clock()
    queue: FairQueue[str] = FairQueue(limit=10)
    for item in ("a1", "a2", "a3"):
        queue.push("a", "normal", clock.seconds(), item)
    queue.push("b", "normal", clock.seconds(), "b1")
    queue.push("c", "normal", clock.seconds(), "c1")
    queue.push("b", "normal", clock.seconds(), "b2")
    assert serve_all(queue, clock) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_bands_first_then_aging_lifts_the_low():
    clock = Clock()
    queue: FairQueue[str] = FairQueue(limit=10, aging=2.0)
    queue.push("x", "low", clock.seconds(), "low1")
    queue.push("y", "high", clock.seconds(), "high1")
    queue.push("z", "normal", clock.seconds(), "normal1")
    assert [w.item for w in queue.in_order(clock.seconds())] == ["high1", "normal1", "low1"]
    clock.advance(4.0)  # the low one has climbed two bands; new high arrivals do not starve it
    queue.push("y", "high", clock.seconds(), "high2")
    assert queue.in_order(clock.seconds())[0].item == "low1"


def test_bounded_and_removal():
    clock = Clock()
    queue: FairQueue[str] = FairQueue(limit=2)
    first = queue.push("a", "normal", 0, "1")
    assert queue.push("b", "low", 0, "2") is not None
    assert queue.push("c", "high", 0, "3") is None
    assert queue.depth_by_band() == {"high": 0, "normal": 1, "low": 1}
    assert first is not None
    queue.remove(first)
    queue.remove(first)  # twice is harmless
    assert len(queue) == 1
    assert [w.item for w in queue.in_order(clock.seconds())] == ["2"]


def test_slot_rate_estimates_retry_after():
    clock = Clock()
    rate = SlotRate()
    assert rate.retry_after(5, clock.seconds(), fallback=3) == 3  # nothing seen: the fallback
    for _ in range(11):
        clock.advance(0.5)  # two slots a second
        rate.freed(clock.seconds())
    assert rate.per_second(clock.seconds()) is not None
    assert rate.retry_after(9, clock.seconds()) == 5  # ten more slots at ~2/s
    assert rate.retry_after(10_000, clock.seconds()) == 60  # capped
    assert rate.retry_after(0, clock.seconds()) == 1
