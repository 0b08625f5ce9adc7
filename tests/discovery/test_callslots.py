"""CallSlots: known work first, slots kept from first lookups, turns by client address."""

import pytest
from twisted.internet import defer

from blyanproxy.discovery.callslots import CallSlots, reserved_slots


class Calls:
    """Calls that wait until the test ends them, in the order they started."""

    def __init__(self):
        self.started = []  # (name, deferred)

    def call(self, name):
        def start():
            answer = defer.Deferred()
            self.started.append((name, answer))
            return answer
        return start

    def names(self):
        return [name for name, _ in self.started]

    def end(self, name, result=None):
        answer = next(d for started, d in self.started if started == name)
        answer.callback(result)


@pytest.mark.parametrize(("size", "reserved"), [(1, 0), (3, 0), (4, 1), (8, 2), (10, 2)])
def test_a_quarter_of_the_slots_is_kept_from_first_lookups(size, reserved):
    assert reserved_slots(size) == reserved


def test_first_lookups_leave_the_reserved_slots_to_known_keys():
    slots, calls = CallSlots(4, per_client=10), Calls()
    for n in range(5):
        slots.run(calls.call(f"first-{n}"), client="6.6.6.6")
    assert calls.names() == ["first-0", "first-1", "first-2"]
    slots.run(calls.call("refresh"))
    assert calls.names()[-1] == "refresh" and slots.queued_first() == 2


def test_a_freed_slot_goes_to_known_work_before_first_lookups():
    slots, calls = CallSlots(1, per_client=10), Calls()
    slots.run(calls.call("first-0"), client="a")
    slots.run(calls.call("first-1"), client="a")
    slots.run(calls.call("refresh"))
    calls.end("first-0")
    assert calls.names() == ["first-0", "refresh"]
    calls.end("refresh")
    assert calls.names() == ["first-0", "refresh", "first-1"]


def test_queued_first_lookups_take_turns_by_address():
    slots, calls = CallSlots(1, per_client=10), Calls()
    slots.run(calls.call("busy"))
    for n in range(3):
        slots.run(calls.call(f"flood-{n}"), client="6.6.6.6")
    slots.run(calls.call("newcomer"), client="10.2.2.2")
    for name in ("busy", "flood-0"):
        calls.end(name)
    assert calls.names() == ["busy", "flood-0", "newcomer"]


def test_an_address_is_admitted_until_its_limit_of_first_lookups_is_under_way():
    slots, calls = CallSlots(8, per_client=2), Calls()
    slots.run(calls.call("a"), client="6.6.6.6")
    assert slots.admits("6.6.6.6")
    slots.run(calls.call("b"), client="6.6.6.6")
    assert not slots.admits("6.6.6.6") and slots.admits("10.2.2.2")
    calls.end("a")
    assert slots.admits("6.6.6.6")


def test_outcomes_reach_the_caller_and_calls_ending_at_once_free_their_slot():
    slots = CallSlots(1, per_client=10)
    results = []
    for n in range(50):  # each ends synchronously: no recursion, every one runs
        slots.run(lambda n=n: defer.succeed(n), client="a").addCallback(results.append)
    slots.run(lambda: defer.fail(ValueError("no"))).addErrback(lambda failure: results.append(failure.type))
    assert results == list(range(50)) + [ValueError]
    assert slots.admits("a") and slots.queued_first() == 0
