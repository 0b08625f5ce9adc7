"""WorkloadDirectory under a flood of random API keys from one address (issue 20, item 2), on a task.Clock.

The workloads API here takes ``API_SECONDS`` to answer every call, refuses
every key but the good ones, and records what it was asked.
"""

import itertools

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from blyanproxy.discovery.directory import WorkloadDirectory
from blyanproxy.discovery.keycache import CacheLimits
from blyanproxy.discovery.pools import KeyedBalancer
from blyanproxy.discovery.workloads import NodeAddressing, Workload
from blyanproxy.discovery.workloadsapi import KeyRefused

LIMITS = CacheLimits(refresh=60, idle=180, negative_ttl=5, rejected_ttl=30, stale_max=300)
API_SECONDS = 2.0
FLOODER, USER, NEWCOMER = "6.6.6.6", "10.1.1.1", "10.2.2.2"
GOOD_KEY, NEW_KEY = b"good-key", b"new-key"


class SlowAPI:
    """A workloads API that answers each call after ``API_SECONDS``: the good keys run one workload."""

    def __init__(self, clock, good):
        self._clock = clock
        self._good = good
        self.asked = []

    def fetch(self, key):
        self.asked.append(key)
        answer = defer.Deferred()
        if key in self._good:
            workload = Workload(workload="wl", node="10.0.0.1:8000", running=True, status="running")
            self._clock.callLater(API_SECONDS, answer.callback, (workload,))
        else:
            self._clock.callLater(API_SECONDS, answer.errback, KeyRefused("the workloads API refused the key (401)"))
        return answer

    def close(self):
        return defer.succeed(None)


class Outcomes:
    """What each ``lookup_for`` was told, in order (``found`` names whether the list has nodes)."""

    def __init__(self):
        self.heard = []

    def ask(self, directory, key, client):
        directory.lookup_for(key, lambda record: self.heard.append(("found", bool(record.state.nodes))),
                             lambda error: self.heard.append(("refused", error.code)), lambda: None,
                             client=client)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def api(clock):
    return SlowAPI(clock, {GOOD_KEY, NEW_KEY})


@pytest.fixture
def directory(clock, api):
    found = WorkloadDirectory(api, clock, KeyedBalancer(clock), LIMITS, NodeAddressing("http"),
                              max_keys=1000, max_fetches=8)
    found.startService()
    yield found
    found.stopService()


random_keys = (b"random-%d" % n for n in itertools.count())


def flood(directory, clock, seconds, per_tick=20, tick=0.5):
    """``per_tick`` requests with new random keys from ``FLOODER`` every ``tick``, for ``seconds``."""
    flooder = Outcomes()
    for _ in range(int(seconds / tick)):
        for _ in range(per_tick):
            flooder.ask(directory, next(random_keys), FLOODER)
        clock.advance(tick)
    return flooder


def test_a_cached_key_keeps_working_through_a_long_flood(directory, clock, api):
    user = Outcomes()
    user.ask(directory, GOOD_KEY, USER)
    clock.advance(API_SECONDS)
    assert user.heard == [("found", True)]
    for _ in range(100):  # 1000 s, past WORKLOADS_STALE_MAX: the list must be refreshed all along
        flood(directory, clock, 10)
        user.ask(directory, GOOD_KEY, USER)
    clock.advance(API_SECONDS)
    assert user.heard == [("found", True)] * 101
    assert api.asked.count(GOOD_KEY) >= 1000 // 60  # refreshed every WORKLOADS_REFRESH_MS, flood or not


def test_a_new_key_from_another_address_gets_its_call_while_one_address_floods(directory, clock, api):
    flood(directory, clock, 30)
    newcomer = Outcomes()
    newcomer.ask(directory, NEW_KEY, NEWCOMER)
    assert api.asked[-1] == NEW_KEY  # asked at once, not queued behind the flood
    flooder = flood(directory, clock, API_SECONDS)
    assert newcomer.heard == [("found", True)]
    assert ("refused", "too_many_new_keys") in flooder.heard


def test_one_address_has_at_most_its_limit_of_first_lookups_under_way(directory, clock, api):
    flooder = flood(directory, clock, 60)
    clock.advance(API_SECONDS)
    flooded_calls = [key for key in api.asked if key.startswith(b"random-")]
    # Four calls at a time, each 2 s: at most 4 * 60 / 2 calls in a minute, whatever was sent.
    assert len(flooded_calls) <= 4 * (60 / API_SECONDS + 1)
    assert flooder.heard.count(("refused", "api_key_rejected")) == len(flooded_calls)
    assert not [what for what in flooder.heard if what[0] == "found"]
