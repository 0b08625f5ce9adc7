"""The end-of-request hook: tallies, access records and lines, counters and metrics, with a Clock."""

import io

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.core import NodeRegistry, ProxyError, parse_forward_trust
from blyanproxy.forward.traffic import (
    CLIENT_CLOSED,
    CLIENT_GONE,
    COMPLETE,
    ERROR,
    NODE_CLOSED,
    TIMEOUT,
    UPSTREAM_BROKE,
    AccessRecord,
    RequestCounters,
    TrafficRecorder,
    access_line,
    ended_by,
    redacted_target,
    write_access_line,
)
from blyanproxy.metrics import ProxyMetrics


class Request(DummyRequest):
    """A DummyRequest over plain HTTP."""

    def isSecure(self):
        return False


def request(uri=b"/v1/models", method=b"GET", body=b"", peer="192.0.2.7", forwarded_for=None):
    r = Request([])
    r.uri, r.method = uri, method
    r.content = io.BytesIO(body)
    r.client = IPv4Address("TCP", peer, 40000)
    if forwarded_for is not None:
        r.requestHeaders.setRawHeaders(b"x-forwarded-for", [forwarded_for])
    return r


def record(**changes):
    fields = dict(method="POST", target=b"/v1/chat/completions", status=200, node="gpu-a", attempts=1, ttfb=0.0413,
                  duration=2.2107, bytes_in=312, bytes_out=5120, ended=COMPLETE, client="127.0.0.1")
    fields.update(changes)
    return AccessRecord(**fields)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ended():
    return []


@pytest.fixture
def recorder(clock, ended):
    found = TrafficRecorder(clock)
    found.subscribe(ended.append)
    return found


def test_the_access_line():
    assert access_line(record()) == (
        "127.0.0.1 POST /v1/chat/completions status=200 node=gpu-a attempts=1 ttfb_ms=41.3 duration_ms=2210.7 "
        "bytes_in=312 bytes_out=5120 ended=complete"
    )
    assert access_line(record(node=None, ttfb=None, attempts=0, status=503, ended=ERROR)).startswith(
        "127.0.0.1 POST /v1/chat/completions status=503 node=- attempts=0 ttfb_ms=- ")


def test_the_access_line_has_the_tokens_the_node_reported():
    line = access_line(record(tokens_in=12, tokens_out=7, caller="key-0123456789"))
    assert line.endswith(" ended=complete tokens_in=12 tokens_out=7")
    assert "key-" not in line


def test_query_values_never_reach_the_line():
    assert redacted_target(b"/v1/models?api_key=SECRET&x=1&flag") == "/v1/models?api_key=…&x=…&flag=…"
    assert redacted_target(b"/plain") == "/plain"
    assert "SECRET" not in access_line(record(target=b"/x?token=SECRET"))


def test_a_tally_becomes_one_record_when_it_ends(recorder, clock, ended):
    tally = recorder.begin(request(b"/v1/chat/completions?stream=1", b"POST", body=b"{}" * 10))
    clock.advance(0.25)
    tally.node, tally.attempts, tally.ttfb, tally.bytes_out = "gpu-a", 2, 0.1, 99
    clock.advance(0.5)
    tally.end(200, COMPLETE)
    tally.end(499, CLIENT_GONE)  # a late second ending changes nothing
    assert ended == [AccessRecord(method="POST", target=b"/v1/chat/completions?stream=1", status=200, node="gpu-a",
                                  attempts=2, ttfb=0.1, duration=0.75, bytes_in=20, bytes_out=99, ended=COMPLETE,
                                  client="192.0.2.7")]


def test_every_listener_hears_every_ending(clock):
    recorder = TrafficRecorder(clock)
    first, second = [], []
    recorder.subscribe(first.append)
    recorder.subscribe(second.append)
    recorder.begin(request()).end(200, COMPLETE)
    assert len(first) == len(second) == 1 and first == second


def test_the_client_address_follows_trust_forwarded(clock, ended):
    forwarded = request(peer="10.0.0.2", forwarded_for=b"203.0.113.9")
    TrafficRecorder(clock).begin(forwarded).end(200, COMPLETE)  # no listener: nothing heard
    untrusting = TrafficRecorder(clock)
    trusting = TrafficRecorder(clock, parse_forward_trust("10.0.0.0/8"))
    for one in (untrusting, trusting):
        one.subscribe(ended.append)
        tally = one.begin(forwarded)
        assert tally.client.address == "10.0.0.2"
        tally.end(200, COMPLETE)
    assert [r.client for r in ended] == ["10.0.0.2", "203.0.113.9"]


def test_the_request_body_size_is_read_without_moving_the_body(recorder, ended):
    posted = request(method=b"POST", body=b"x" * 1000)
    tally = recorder.begin(posted)
    assert posted.content.read() == b"x" * 1000
    tally.end(200, COMPLETE)
    assert ended[0].bytes_in == 1000


@pytest.mark.parametrize(("ending", "failed"), [
    (COMPLETE, False), (CLIENT_GONE, False), (CLIENT_CLOSED, False), (NODE_CLOSED, False),
    (UPSTREAM_BROKE, True), (TIMEOUT, True), (ERROR, True),
])
def test_the_counters_count_requests_for_nodes_and_their_failures(ending, failed):
    counters = RequestCounters()
    counters.count(record(ended=ending))
    assert (counters.requests, counters.failures) == (1, int(failed))


def test_the_counters_skip_the_proxys_own_endpoints():
    counters = RequestCounters()
    counters.count(record(own_endpoint=True, ended=ERROR, status=401))
    assert (counters.requests, counters.failures) == (0, 0)


def test_an_error_ends_as_timeout_only_for_504():
    assert ended_by(ProxyError(504, "upstream_timeout", "slow")) == TIMEOUT
    assert ended_by(ProxyError(502, "upstream_failed", "broken")) == ERROR
    assert ended_by(ProxyError(503, "no_healthy_nodes", "none")) == ERROR


def test_the_access_log_listener_writes_the_line_in_its_namespace():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        write_access_line(record())
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == "blyanproxy.access"]
    assert event["line"] == access_line(record())


def test_failed_attempts_and_open_streams_reach_the_metrics(clock):
    metrics = ProxyMetrics(NodeRegistry(), clock)
    recorder = TrafficRecorder(clock, metrics=metrics)
    recorder.attempt_failed("gpu-a", "refused")
    recorder.stream("websocket", +1)
    recorder.stream("sse", +1)
    recorder.stream("sse", -1)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}
    assert samples[("blyan_failed_attempts_total", (("node", "gpu-a"), ("reason", "refused")))] == 1
    assert samples[("blyan_open_streams", (("kind", "websocket"),))] == 1
    assert samples[("blyan_open_streams", (("kind", "sse"),))] == 0
    TrafficRecorder(clock).attempt_failed("gpu-a", "refused")  # without metrics: nothing to tell, no error
