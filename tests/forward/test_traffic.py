"""The end-of-request hook: tallies, access records and lines, counters and metrics, with a Clock."""

import contextlib
import io

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.core import Node, NodeRegistry, ProxyError, parse_forward_trust
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
    access_fields,
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
    assert access_line(record(request_id="req-42")) == (
        "127.0.0.1 POST /v1/chat/completions status=200 node=gpu-a attempts=1 ttfb_ms=41.3 duration_ms=2210.7 "
        "bytes_in=312 bytes_out=5120 ended=complete request_id=req-42"
    )
    assert access_line(record()).endswith(" request_id=-")
    assert access_line(record(node=None, ttfb=None, attempts=0, status=503, ended=ERROR)).startswith(
        "127.0.0.1 POST /v1/chat/completions status=503 node=- attempts=0 ttfb_ms=- ")


def test_the_access_line_has_the_tokens_the_node_reported():
    line = access_line(record(tokens_in=12, tokens_out=7, caller="key-0123456789"))
    assert line.endswith(" ended=complete tokens_in=12 tokens_out=7 request_id=-")
    assert "key-" not in line


def test_query_values_never_reach_the_line():
    assert redacted_target(b"/v1/models?api_key=SECRET&x=1&=v") == "/v1/models?api_key=…&x=…&=…"
    assert redacted_target(b"/plain") == "/plain"
    assert "SECRET" not in access_line(record(target=b"/x?token=SECRET"))


def test_a_parameter_without_a_name_is_redacted_whole():
    # ``?sk-live-SECRET123`` has no ``=``: it is a bare value, as likely a key as a flag.
    assert redacted_target(b"/v1/models?sk-live-SECRET123") == "/v1/models?…"
    assert redacted_target(b"/x?a=1&sk-live-SECRET123&&b=2") == "/x?a=…&…&b=…"


@pytest.mark.parametrize(("raw", "logged"), [
    (b"%1B%5B31m", "\\x1b[31m"),  # ESC: no terminal escape reaches the log
    (b"a%0D%0AX-Injected", "a\\x0d\\x0aX-Injected"),  # CR LF: no forged log line
    (b"%E2%80%A8%E2%80%A9", "\\u2028\\u2029"),  # line and paragraph separators
    (b"%E2%80%AE", "\\u202e"),  # a bidi override
    (b"%7F%00%C2%85", "\\x7f\\x00\\x85"),
    (b"%FF", "\\xff"),  # not UTF-8: the byte
    (b"a+b%5C", "a\\x20b\\\\"),  # a space cannot split the line's fields; a backslash is doubled
    (b"caf%C3%A9", "caf\u00e9"),  # printable text stays readable
])
def test_query_names_are_logged_decoded_but_escaped(raw, logged):
    assert redacted_target(b"/x?" + raw + b"=v") == "/x?" + logged + "=…"


def test_a_tally_becomes_one_record_when_it_ends(recorder, clock, ended):
    arrived = request(b"/v1/chat/completions?stream=1", b"POST", body=b"{}" * 10)
    arrived.requestHeaders.setRawHeaders(b"x-request-id", [b"client-7"])
    tally = recorder.begin(arrived)
    clock.advance(0.25)
    tally.node, tally.attempts, tally.ttfb, tally.bytes_out = "gpu-a", 2, 0.1, 99
    clock.advance(0.5)
    tally.end(200, COMPLETE)
    tally.end(499, CLIENT_GONE)  # a late second ending changes nothing
    assert ended == [AccessRecord(method="POST", target=b"/v1/chat/completions?stream=1", status=200, node="gpu-a",
                                  attempts=2, ttfb=0.1, duration=0.75, bytes_in=20, bytes_out=99, ended=COMPLETE,
                                  client="192.0.2.7", request_id="client-7")]


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
    assert formatEvent(event) == access_line(record())
    assert {key: event[key] for key in access_fields(record())} == access_fields(record())


def test_the_access_event_names_every_field_of_the_record():
    shown = access_fields(record(target=b"/v1/x?api_key=secret&n=1", ttfb=0.01234, duration=1.5))
    assert shown == {
        "method": "POST", "path": "/v1/x?api_key=…&n=…", "status": 200, "node": "gpu-a", "attempts": 1,
        "ttfb_ms": 12.3, "duration_ms": 1500.0, "bytes_in": 312, "bytes_out": 5120, "ended": "complete",
        "client": "127.0.0.1", "own_endpoint": False, "request_id": None,
        "model": None, "caller": None, "tokens_in": None, "tokens_out": None,
    }
    assert access_fields(record(ttfb=None, node=None))["ttfb_ms"] is None
    assert set(access_fields(record())) == {
        {"target": "path", "ttfb": "ttfb_ms", "duration": "duration_ms"}.get(field.name, field.name)
        for field in attrs.fields(AccessRecord)
    }  # a field added to the record is in the event too


def test_an_access_line_with_braces_is_its_own_message():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        write_access_line(record(target=b"/v1/{model}/x%7D"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == "blyanproxy.access"]
    assert formatEvent(event) == access_line(record(target=b"/v1/{model}/x%7D"))


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


@contextlib.contextmanager
def logged_events():
    """Every log event while the block runs (``with logged_events() as events``)."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_usable_client_request_id_is_kept_and_returned(recorder, ended):
    arrived = request()
    arrived.requestHeaders.setRawHeaders(b"X-Request-Id", [b"trace-" + b"a" * 100])
    tally = recorder.begin(arrived)
    assert tally.request_id == "trace-" + "a" * 100
    assert arrived.responseHeaders.getRawHeaders(b"x-request-id") == [b"trace-" + b"a" * 100]
    tally.attempt_started(Node(id="n", name="gpu-a", base_url="http://10.0.0.1:8000"), 1)
    assert tally.node_headers == [(b"X-Request-Id", b"trace-" + b"a" * 100)]  # what the node is sent
    tally.end(200, COMPLETE)
    assert ended[0].request_id == tally.request_id


@pytest.mark.parametrize(("sent", "why"), [
    ([b""], "empty"),
    ([b"x" * 129], "longer than 128"),
    ([b"has space"], "printable"),
    ([b"caf\xc3\xa9"], "printable"),
    ([b"first-id", b"second-id"], "more than once"),
])
def test_an_unusable_client_request_id_is_replaced_and_the_log_says_why(recorder, sent, why):
    arrived = request()
    arrived.requestHeaders.setRawHeaders(b"X-Request-Id", sent)
    with logged_events() as events:
        tally = recorder.begin(arrived)
    assert len(tally.request_id) == 32 and int(tally.request_id, 16) >= 0
    assert arrived.responseHeaders.getRawHeaders(b"x-request-id") == [tally.request_id.encode()]
    [line] = [e for e in events if e.get("log_namespace") == "blyanproxy.proxy"]
    assert why in line["why"] and line["request_id"] == tally.request_id
    for value in sent:
        assert not value or value.decode("latin-1") not in str(line)  # the rejected value is not logged


def test_without_a_client_request_id_each_request_gets_a_fresh_one(recorder):
    ids = {recorder.begin(request()).request_id for _ in range(20)}
    assert len(ids) == 20 and all(len(one) == 32 for one in ids)


class Watcher:
    """A RequestWatcher that notes what it hears."""

    def __init__(self):
        self.heard = []

    def began(self, tally, headers):
        self.heard.append(("began", tally.target, dict(headers).get(b"Traceparent")))

    def attempt_started(self, tally, node, number):
        self.heard.append(("attempt", node.name, number))
        return [(b"traceparent", b"00-attempt-%d" % number)]

    def attempt_failed(self, tally, node, reason):
        self.heard.append(("failed", node, reason))

    def queue_waited(self, tally, since, until):
        self.heard.append(("queued", since, until))

    def ended(self, tally, record):
        self.heard.append(("ended", record.status, record.request_id == tally.request_id))


def test_a_watcher_hears_a_request_for_a_node_from_beginning_to_end(clock):
    recorder = TrafficRecorder(clock)
    watcher = Watcher()
    recorder.watch(watcher)
    arrived = request()
    arrived.requestHeaders.setRawHeaders(b"traceparent", [b"00-parent"])
    tally = recorder.begin(arrived)
    clock.advance(1)
    tally.queue_waited(0.0)
    for number, name in ((1, "gpu-a"), (2, "gpu-b")):
        tally.attempt_started(Node(id=name, name=name, base_url="http://10.0.0.1:8000"), number)
    tally.attempt_failed("gpu-b", "refused")
    tally.end(502, ERROR)
    assert tally.node_headers == [(b"X-Request-Id", tally.request_id.encode()), (b"traceparent", b"00-attempt-2")]
    assert watcher.heard == [
        ("began", b"/v1/models", [b"00-parent"]), ("queued", 0.0, 1.0),
        ("attempt", "gpu-a", 1), ("attempt", "gpu-b", 2), ("failed", "gpu-b", "refused"), ("ended", 502, True),
    ]


def test_the_proxys_own_endpoints_are_not_watched(clock):
    recorder = TrafficRecorder(clock)
    watcher = Watcher()
    recorder.watch(watcher)
    recorder.begin(request(b"/health"), own_endpoint=True).end(200, COMPLETE)
    assert watcher.heard == []


@given(st.binary(max_size=60))
def test_a_redacted_target_is_one_printable_field_for_any_query(query):
    logged = redacted_target(b"/x?" + query)
    assert all(char.isprintable() and char != " " for char in logged), logged
