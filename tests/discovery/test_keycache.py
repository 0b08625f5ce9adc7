"""The per-key cache's timing rules, as pure functions of a state and ``now``."""

import pytest

from blyanproxy.discovery import keycache
from blyanproxy.discovery.keycache import (
    FAILED,
    FETCH,
    FETCHED,
    KEY_REFUSED,
    REJECTED,
    SERVE,
    UNAVAILABLE,
    CacheLimits,
    KeyState,
    after_fetch,
    decide,
    is_idle,
    refresh_due,
)

LIMITS = CacheLimits(refresh=60, idle=180, negative_ttl=5, rejected_ttl=30, stale_max=300)
WITH_NODES = after_fetch(KeyState(), FETCHED, 100.0, ("w",), ("n",))
EMPTY = after_fetch(KeyState(), FETCHED, 100.0, ("stopped",), ())
REFUSED = after_fetch(WITH_NODES, KEY_REFUSED, 100.0)
NEVER_ANSWERED = after_fetch(KeyState(), FAILED, 100.0)


@pytest.mark.parametrize(
    "state, now, may_fetch, expected",
    [
        (KeyState(), 0.0, True, FETCH),
        (KeyState(), 0.0, False, UNAVAILABLE),
        (WITH_NODES, 100.0, True, SERVE),
        (WITH_NODES, 400.0, True, SERVE),  # at the stale limit
        (WITH_NODES, 400.1, True, FETCH),  # past it: ask again
        (WITH_NODES, 400.1, False, UNAVAILABLE),
        (EMPTY, 104.9, True, SERVE),  # "no running workload" remembered
        (EMPTY, 105.0, True, FETCH),
        (EMPTY, 105.0, False, SERVE),
        (REFUSED, 129.9, True, REJECTED),
        (REFUSED, 130.0, True, FETCH),
        (REFUSED, 130.0, False, REJECTED),
        (NEVER_ANSWERED, 104.9, True, UNAVAILABLE),  # no storm while the API is down
        (NEVER_ANSWERED, 105.0, True, FETCH),
    ],
)
def test_decide(state, now, may_fetch, expected):
    assert decide(state, now, LIMITS, may_fetch) == expected


def test_a_failed_refresh_keeps_the_list_until_it_is_too_old():
    failing = after_fetch(WITH_NODES, FAILED, 200.0)
    assert failing.nodes == ("n",) and failing.fetched_at == 100.0
    assert decide(failing, 300.0, LIMITS) == SERVE
    assert decide(failing, 401.0, LIMITS) == FETCH
    assert decide(after_fetch(failing, FAILED, 401.0), 402.0, LIMITS) == UNAVAILABLE


def test_a_refused_key_loses_its_list_at_once():
    assert REFUSED.nodes == () and REFUSED.fetched_at is None


def test_refresh_is_due_only_for_keys_with_a_list():
    assert not refresh_due(WITH_NODES, 159.9, LIMITS)
    assert refresh_due(WITH_NODES, 160.0, LIMITS)
    assert refresh_due(EMPTY, 160.0, LIMITS)
    assert refresh_due(after_fetch(WITH_NODES, FAILED, 130.0), 190.0, LIMITS)
    assert not refresh_due(REFUSED, 1000.0, LIMITS)
    assert not refresh_due(NEVER_ANSWERED, 1000.0, LIMITS)


def test_idle_needs_time_and_nothing_in_flight():
    assert not is_idle(100.0, 0, 279.9, LIMITS)
    assert is_idle(100.0, 0, 280.0, LIMITS)
    assert not is_idle(100.0, 1, 1000.0, LIMITS)


def test_node_changes_name_who_joined_and_left():
    class N:
        def __init__(self, name):
            self.name = name

    assert keycache.node_changes((N("a"), N("b")), (N("b"), N("c"))) == (["c"], ["a"])
