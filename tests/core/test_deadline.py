"""LazyDeadline: set and cleared per request, one timer per owner, on time all the same."""

from twisted.internet.task import Clock

from blyanproxy.core import LazyDeadline


def test_a_deadline_runs_its_action_on_time_once():
    clock, ran = Clock(), []
    deadline = LazyDeadline(clock)
    deadline.arm(5.0, lambda: ran.append(clock.seconds()))
    clock.advance(4.9)
    assert ran == [] and deadline.armed
    clock.advance(0.1)
    assert ran == [5.0] and not deadline.armed
    clock.advance(100)
    assert ran == [5.0] and clock.getDelayedCalls() == []


def test_cleared_deadlines_share_one_timer_and_never_run():
    clock, ran = Clock(), []
    deadline = LazyDeadline(clock)
    for _ in range(1000):  # a request per millisecond, each clearing its deadline
        deadline.arm(30.0, lambda: ran.append("late"))
        clock.advance(0.001)
        deadline.disarm()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(60)
    assert ran == [] and clock.getDelayedCalls() == []  # the lapsed timer left nothing behind


def test_a_later_deadline_is_kept_past_the_earlier_timer():
    clock, ran = Clock(), []
    deadline = LazyDeadline(clock)
    deadline.arm(30.0, lambda: ran.append("head"))
    clock.advance(1)
    deadline.arm(60.0, lambda: ran.append(("body", clock.seconds())))  # the timer is due at 30 still
    clock.advance(29)
    assert ran == [] and deadline.armed  # woke at 30, set itself for 61
    clock.advance(30.9)
    assert ran == []
    clock.advance(0.1)
    assert ran == [("body", 61.0)]


def test_an_earlier_deadline_moves_the_timer_up():
    clock, ran = Clock(), []
    deadline = LazyDeadline(clock)
    deadline.arm(600.0, lambda: ran.append("answer"))
    deadline.arm(2.0, lambda: ran.append("head"))  # replaces it, and is earlier
    clock.advance(2.0)
    assert ran == ["head"]
    clock.advance(600)
    assert ran == ["head"]


def test_stop_leaves_no_timer():
    clock, ran = Clock(), []
    deadline = LazyDeadline(clock)
    deadline.arm(5.0, lambda: ran.append(1))
    deadline.stop()
    assert clock.getDelayedCalls() == [] and not deadline.armed
    clock.advance(10)
    assert ran == []
    deadline.arm(1.0, lambda: ran.append(2))  # usable again
    clock.advance(1.0)
    assert ran == [2]
