"""WorkloadDirectory with a task.Clock and a fake API client: sharing, refresh, eviction, bounds."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from blyanproxy.discovery import WorkloadDirectory
from blyanproxy.errors import ProxyError
from blyanproxy.keycache import CacheLimits
from blyanproxy.pools import KeyedBalancer
from blyanproxy.workloads import NodeAddressing, Workload
from blyanproxy.workloadsapi import KeyRefused, WorkloadsUnavailable

LIMITS = CacheLimits(refresh=60, idle=180, negative_ttl=5, rejected_ttl=30, stale_max=300)


def running(node, *tags):
    return Workload(workload=f"wl-{node}", node=node, running=True, status="running", tags=tags)


class FakeClient:
    """Answers by hand: each fetch waits until the test resolves it."""

    def __init__(self):
        self.pending = []  # (key, deferred)
        self.closed = False

    def fetch(self, key):
        d = defer.Deferred()
        self.pending.append((key, d))
        return d

    def answer(self, result):
        key, d = self.pending.pop(0)
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(tuple(result))

    def close(self):
        self.closed = True
        return defer.succeed(None)


def outcome(deferred):
    results = []
    deferred.addBoth(results.append)
    assert results, "the lookup has not finished"
    return results[0]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def client():
    return FakeClient()


@pytest.fixture
def directory(clock, client):
    found = WorkloadDirectory(client, clock, KeyedBalancer(clock), LIMITS, NodeAddressing("http"),
                              max_keys=3, max_fetches=2)
    found.startService()
    yield found
    found.stopService()


def test_concurrent_first_lookups_share_one_call(directory, client):
    lookups = [directory.lookup(b"k") for _ in range(100)]
    assert len(client.pending) == 1
    client.answer([running("10.0.0.1:8000")])
    records = [outcome(d) for d in lookups]
    assert all(r is records[0] for r in records)
    assert [n.base_url for n in directory.pool(records[0]).nodes] == ["http://10.0.0.1:8000"]
    assert len(client.pending) == 0


def test_a_key_in_use_is_refreshed_every_interval_and_forgotten_when_idle(directory, client, clock):
    lookup = directory.lookup(b"k")
    client.answer([running("a")])
    record = outcome(lookup)
    clock.pump([1] * 59)
    assert client.pending == []
    clock.advance(1)
    assert [key for key, _ in client.pending] == [b"k"]
    client.answer([running("b")])
    assert [n.name for n in record.state.nodes] == ["b"]
    # Unused since t=0: refreshed at 120 too, forgotten at 180.
    clock.pump([1] * 60)
    client.answer([running("b")])
    assert directory.key_count == 1
    clock.pump([1] * 60)
    assert directory.key_count == 0 and client.pending == []


def test_a_key_with_requests_in_flight_is_not_forgotten(directory, client, clock):
    lookup = directory.lookup(b"k")
    client.answer([running("a")])
    record = outcome(lookup)
    directory.started(record)
    for _ in range(5):
        clock.pump([1] * 60)
        while client.pending:
            client.answer([running("a")])
    assert directory.key_count == 1
    record.finished()
    clock.pump([1] * 60)
    assert directory.key_count == 0


def test_refused_and_empty_answers_are_remembered_and_never_polled(directory, client, clock):
    refused = directory.lookup(b"bad")
    client.answer(KeyRefused("the workloads API refused the key (401)"))
    assert outcome(refused).value.status == 401
    empty = directory.lookup(b"idle")
    client.answer([Workload(workload="w", node="a", running=False, status="stopped")])
    with pytest.raises(ProxyError) as raised:
        directory.pool(outcome(empty))
    assert raised.value.code == "no_workloads"
    for _ in range(20):  # 4 s of hammering: all from the cache
        assert outcome(directory.lookup(b"bad")).value.code == "api_key_rejected"
        assert outcome(directory.lookup(b"idle")).state.nodes == ()
        clock.advance(0.2)
    assert client.pending == []
    clock.advance(1.1)  # the empty answer is 5 s old: asked again on demand
    directory.lookup(b"idle")
    assert [key for key, _ in client.pending] == [b"idle"]


def test_stale_list_is_served_while_the_api_fails_then_502(directory, client, clock):
    lookup = directory.lookup(b"k")
    client.answer([running("a")])
    record = outcome(lookup)
    for _ in range(4):  # refreshes at 60, 120, 180, 240 all fail
        clock.pump([1] * 60)
        directory.lookup(b"k")  # keep the key in use
        client.answer(WorkloadsUnavailable("the workloads API answered 500"))
    assert outcome(directory.lookup(b"k")) is record and record.state.nodes
    clock.pump([1] * 61)  # t=301: the list is past WORKLOADS_STALE_MAX
    while client.pending:
        client.answer(WorkloadsUnavailable("the workloads API answered 500"))
    late = directory.lookup(b"k")
    if client.pending:
        client.answer(WorkloadsUnavailable("the workloads API answered 500"))
    assert outcome(late).value.code == "workloads_unavailable"


def test_the_cache_is_bounded_least_recently_used_first(directory, client):
    for key in (b"a", b"b", b"c"):
        d = directory.lookup(key)
        client.answer([running("n")])
        outcome(d)
    directory.lookup(b"a")  # a is now the most recent
    d = directory.lookup(b"d")
    client.answer([running("n")])
    outcome(d)
    assert directory.key_count == 3
    directory.lookup(b"b")  # b was the least recently used: forgotten, so asked again
    assert [key for key, _ in client.pending] == [b"b"]


def test_at_most_max_fetches_calls_at_once(directory, client):
    lookups = [directory.lookup(key) for key in (b"a", b"b", b"c")]
    assert len(client.pending) == 2
    client.answer([running("n")])
    assert len(client.pending) == 2
    client.answer([running("n")])
    client.answer([running("n")])
    assert all(not isinstance(outcome(d), Exception) for d in lookups)


def test_stopping_closes_the_client(clock, client):
    found = WorkloadDirectory(client, clock, KeyedBalancer(clock), LIMITS)
    found.startService()
    found.stopService()
    assert client.closed and clock.getDelayedCalls() == []
