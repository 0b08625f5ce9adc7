"""WorkloadDirectory with a task.Clock and a fake API client: sharing, refresh, eviction, bounds."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from blyanproxy.core.errors import ProxyError
from blyanproxy.core.nodes import NodeRegistry
from blyanproxy.core.routing import Route
from blyanproxy.discovery.directory import WorkloadDirectory
from blyanproxy.discovery.keycache import CacheLimits
from blyanproxy.discovery.pools import KeyedBalancer, KeyPool
from blyanproxy.discovery.workloads import NodeAddressing, Workload, workload_nodes
from blyanproxy.discovery.workloadsapi import KeyRefused, WorkloadsUnavailable
from blyanproxy.metrics import ProxyMetrics

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
def metrics(clock):
    return ProxyMetrics(NodeRegistry(), clock)


def cached_keys(metrics):
    """The keys the cache held at the end of the directory's last sweep, as ``/metrics`` shows them."""
    return metrics.registry.get_sample_value("blyan_workloads_cached_keys")


@pytest.fixture
def directory(clock, client, metrics):
    found = WorkloadDirectory(client, clock, KeyedBalancer(clock), LIMITS, NodeAddressing("http"),
                              max_keys=3, max_fetches=2, metrics=metrics)
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


def test_a_key_in_use_is_refreshed_every_interval_and_forgotten_when_idle(directory, client, clock, metrics):
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
    assert cached_keys(metrics) == 1
    clock.pump([1] * 60)
    assert cached_keys(metrics) == 0 and client.pending == []


def test_a_key_with_requests_in_flight_is_not_forgotten(directory, client, clock, metrics):
    lookup = directory.lookup(b"k")
    client.answer([running("a")])
    record = outcome(lookup)
    directory.started(record)
    for _ in range(5):
        clock.pump([1] * 60)
        while client.pending:
            client.answer([running("a")])
    assert cached_keys(metrics) == 1
    record.finished()
    clock.pump([1] * 60)
    assert cached_keys(metrics) == 0


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
    clock.pump([1] * 61)  # the refresh due at t=300 fails too
    client.answer(WorkloadsUnavailable("the workloads API answered 500"))
    late = directory.lookup(b"k")  # past WORKLOADS_STALE_MAX, and the API failed a second ago
    assert client.pending == [] and outcome(late).value.code == "workloads_unavailable"


def test_the_cache_is_bounded_least_recently_used_first(directory, client, metrics):
    for key in (b"a", b"b", b"c"):
        d = directory.lookup(key)
        client.answer([running("n")])
        outcome(d)
    directory.lookup(b"a")  # a is now the most recent
    d = directory.lookup(b"d")
    client.answer([running("n")])
    outcome(d)
    directory.sweep()
    assert cached_keys(metrics) == 3
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


def test_a_request_waits_at_most_the_wait_limit_and_the_late_answer_is_still_kept(directory, client, clock):
    lookup = directory.lookup(b"k")
    clock.advance(10)
    assert outcome(lookup).value.code == "workloads_unavailable"
    client.answer([running("a")])  # the call ends later: no error, and the list is kept
    assert outcome(directory.lookup(b"k")).state.nodes[0].name == "a"


def test_busy_keys_are_never_forgotten_new_keys_are_refused_instead(directory, client, metrics):
    first = [directory.lookup(key) for key in (b"a", b"b", b"c")]  # all three fetching (c queued)
    assert outcome(directory.lookup(b"d")).value.code == "workloads_busy"
    client.answer([running("n")])  # a now has its list and nothing in flight
    late = directory.lookup(b"d")  # so a is the one forgotten
    directory.sweep()
    assert cached_keys(metrics) == 3 and [key for key, _ in client.pending] == [b"b", b"c"]
    for _ in range(3):
        client.answer([running("n")])
    assert all(not isinstance(outcome(d), Exception) for d in first + [late])
    directory.lookup(b"a")
    assert [key for key, _ in client.pending] == [b"a"]


def test_a_queued_call_whose_requests_all_gave_up_is_not_made(directory, client, clock):
    lookups = [directory.lookup(key) for key in (b"a", b"b", b"c")]
    assert [key for key, _ in client.pending] == [b"a", b"b"]  # c waits for a slot
    clock.advance(10)
    assert all(outcome(d).value.code == "workloads_unavailable" for d in lookups)
    client.answer([running("n")])
    client.answer([running("n")])
    assert client.pending == []


def test_first_lookups_beyond_the_queue_are_refused(clock, client):
    found = WorkloadDirectory(client, clock, KeyedBalancer(clock), LIMITS, max_keys=100, max_fetches=1)
    lookups = [found.lookup(b"k%d" % i) for i in range(9)]  # 1 call + 8 queued
    refused = found.lookup(b"one-too-many")
    assert outcome(refused).value.code == "workloads_busy"
    for _ in lookups:
        client.answer([running("n")])
    assert all(not isinstance(outcome(d), Exception) for d in lookups)


def test_least_in_flight_counts_every_keys_requests():
    clock = Clock()
    balancer = KeyedBalancer(clock)
    a, b = running("10.0.0.1"), running("10.0.0.2")
    nodes = workload_nodes((a, b), NodeAddressing("http"))
    held = KeyPool(nodes[:1], balancer).acquire(Route(b"/"), frozenset())  # another key's request on A
    chosen = [KeyPool(nodes, balancer).acquire(Route(b"/"), frozenset()) for _ in range(1)]
    assert [lease.node.name for lease in chosen] == ["10.0.0.2"]
    held.release()


class Asker:
    """The three callbacks of ``lookup_for``, recording what they were told."""

    def __init__(self):
        self.heard = []

    def found(self, record):
        self.heard.append(("found", record.name))

    def refused(self, error):
        self.heard.append(("refused", error.status, error.code))

    def gone(self):
        self.heard.append(("gone",))


def test_lookup_for_answers_found_once_the_list_comes(directory, client):
    asker = Asker()
    leave = directory.lookup_for(b"k", asker.found, asker.refused, asker.gone, client="10.0.0.9")
    assert asker.heard == []
    client.answer([running("a")])
    leave()  # the client leaving after its answer changes nothing
    assert [what for what, *_ in asker.heard] == ["found"]


def test_lookup_for_a_client_that_leaves_first_is_gone_and_hears_no_answer(directory, client):
    asker = Asker()
    leave = directory.lookup_for(b"k", asker.found, asker.refused, asker.gone, client="10.0.0.9")
    leave()
    client.answer([running("a")])
    leave()
    assert asker.heard == [("gone",)]


def test_lookup_for_turns_every_failure_into_a_proxy_error(directory, client):
    refused, failed = Asker(), Asker()
    directory.lookup_for(b"refused-key", refused.found, refused.refused, refused.gone, client="10.0.0.9")
    client.answer(KeyRefused("no such key"))
    directory.lookup_for(b"other-key", failed.found, failed.refused, failed.gone, client="10.0.0.9")
    client.answer(WorkloadsUnavailable("down"))
    assert refused.heard == [("refused", 401, "api_key_rejected")]
    assert failed.heard == [("refused", 502, "workloads_unavailable")]


def test_lookup_for_logs_a_bug_in_a_callback_instead_of_leaving_it_unhandled(directory, client):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        directory.lookup_for(b"k", lambda record: 1 / 0, Asker().refused, Asker().gone, client="10.0.0.9")
        client.answer([running("a")])
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(event.get("log_failure") is not None and event["log_failure"].check(ZeroDivisionError)
               for event in events)
