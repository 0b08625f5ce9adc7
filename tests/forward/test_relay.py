"""BodyRelay: streaming, flow control, endings and idle timers, with a Clock and StringTransport."""

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from blyanproxy.forward.relay import (
    CLIENT_GONE,
    COMPLETE,
    IDLE_TIMEOUT,
    UPSTREAM_BROKE,
    BodyRelay,
)


class FakeChannel:
    """Raw writes below the request's own chunking."""

    def __init__(self, request):
        self.request = request
        self.transport = self

    def write(self, data):
        self.request.written.append(data)


class FakeRequest:
    """The parts of twisted.web's Request the relay uses (chunked framing like HTTP/1.1)."""

    def __init__(self):
        self.written = []
        self.finished = False
        self.producer = None
        self.channel = FakeChannel(self)
        self.transport = StringTransport()
        self.chunked = 0
        self.started = False

    def write(self, data):
        assert not self.finished
        self.started, self.chunked = True, 1 if not self.started else self.chunked
        if data:
            self.written.append(data)

    def finish(self):
        if self.chunked:
            self.written.append(b"<end-chunk>")
        self.finished = True

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    @property
    def body(self):
        return b"".join(self.written)


class RawUpstream(StringTransport):
    """An upstream connection passing chunked bytes as they are."""

    at_chunk_boundary = True


def make(is_sse=False, idle=30.0, keepalive=15.0, raw=False, **shape):
    clock, request, ends = Clock(), FakeRequest(), []
    upstream = RawUpstream() if raw else StringTransport()
    relay = BodyRelay(request, clock, upstream, idle_timeout=idle, sse_keepalive=keepalive, is_sse=is_sse,
                      on_end=lambda how, sent: ends.append(how), raw_chunks=upstream if raw else None, **shape)
    relay.start()
    return clock, request, relay, upstream, ends


def test_streams_each_chunk_and_finishes():
    clock, request, relay, upstream, ends = make()
    assert request.producer is relay
    relay.dataReceived(b"data: 1\n\n")
    assert request.written == [b"data: 1\n\n"]
    relay.dataReceived(b"data: 2\n\n")
    relay.response_ended(None)
    assert request.body == b"data: 1\n\ndata: 2\n\n<end-chunk>"
    assert request.finished and request.producer is None
    assert ends == [COMPLETE]
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize(("end", "how"), [(lambda relay: relay.response_ended(None), COMPLETE),
                                          (lambda relay: relay.stopProducing(), CLIENT_GONE)])
def test_the_ending_reports_the_bytes_relayed(end, how):
    reports = []
    relay = BodyRelay(FakeRequest(), Clock(), StringTransport(), idle_timeout=30.0, sse_keepalive=0.0,
                      is_sse=False, on_end=lambda how, sent: reports.append((how, sent)))
    relay.start()
    relay.dataReceived(b"12345")
    relay.dataReceived(b"678")
    end(relay)
    assert reports == [(how, 8)]


def test_client_backpressure_pauses_the_node():
    _, _, relay, upstream, _ = make()
    relay.pauseProducing()
    assert upstream.producerState == "paused"
    relay.resumeProducing()
    assert upstream.producerState == "producing"


def test_client_gone_closes_the_node_connection():
    clock, request, relay, upstream, ends = make()
    relay.stopProducing()
    assert upstream.producerState == "stopped"
    assert ends == [CLIENT_GONE]
    assert not request.finished
    relay.response_ended("connection lost")
    assert ends == [CLIENT_GONE]
    assert not clock.getDelayedCalls()


def test_upstream_break_fails_the_client_response():
    _, request, relay, _, ends = make()
    relay.dataReceived(b"partial")
    relay.response_ended("connection lost")
    assert not request.finished
    assert request.transport.disconnecting
    assert ends == [UPSTREAM_BROKE]


def test_upstream_break_on_sse_sends_an_error_event_first():
    _, request, relay, _, ends = make(is_sse=True)
    relay.dataReceived(b'data: {"a"')
    relay.response_ended("connection lost")
    events = request.body.split(b"\n\n")
    error_event = [e for e in events if e.startswith(b"event: error")]
    assert error_event, request.body
    payload = json.loads(error_event[0].split(b"data: ", 1)[1])
    assert payload["code"] == UPSTREAM_BROKE
    assert request.transport.disconnecting and not request.finished


def test_idle_timeout_cuts_a_silent_body():
    clock, request, relay, upstream, ends = make(idle=30.0, keepalive=0)
    clock.advance(20)
    relay.dataReceived(b"x")
    clock.advance(20)
    assert ends == []
    clock.advance(10.5)
    assert ends == [IDLE_TIMEOUT]
    assert upstream.producerState == "stopped"
    assert request.transport.disconnecting


def test_time_paused_by_the_client_is_not_idle():
    clock, _, relay, _, ends = make(idle=30.0, keepalive=0)
    relay.pauseProducing()
    clock.pump([10] * 10)
    assert ends == []
    relay.resumeProducing()
    clock.advance(29)
    assert ends == []
    clock.advance(2)
    assert ends == [IDLE_TIMEOUT]


def test_sse_keepalive_comment_only_between_events():
    clock, request, relay, _, ends = make(is_sse=True, idle=300.0, keepalive=15.0)
    clock.advance(15)
    assert request.body == b": keep-alive\n\n"
    relay.dataReceived(b"data: half")
    clock.pump([15, 15])
    assert request.body == b": keep-alive\n\ndata: half"
    relay.dataReceived(b" done\n\n")
    clock.pump([15, 15])
    assert request.body.endswith(b"done\n\n: keep-alive\n\n: keep-alive\n\n")
    assert ends == []


def test_no_keepalive_for_other_bodies():
    clock, request, _, _, _ = make(is_sse=False, idle=300.0, keepalive=15.0)
    clock.pump([15] * 4)
    assert request.written == []


def test_raw_chunks_pass_as_they_are_and_are_not_terminated_twice():
    _, request, relay, upstream, ends = make(is_sse=True, raw=True)
    assert request.chunked == 1  # the head went out announcing chunked framing
    relay.dataReceived(b"9\r\ndata: 1\n\n\r\n")
    relay.dataReceived(b"0\r\n\r\n")
    relay.response_ended(None)
    assert request.body == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
    assert request.finished and ends == [COMPLETE]


def test_raw_keepalive_and_error_event_are_whole_chunks():
    clock, request, relay, upstream, ends = make(is_sse=True, raw=True, idle=100.0, keepalive=15.0)
    relay.dataReceived(b"9\r\ndata: 1\n\n\r\n")
    clock.advance(15)
    assert request.written[-1] == b"e\r\n: keep-alive\n\n\r\n"
    relay.response_ended("connection lost")
    last = request.written[-1]
    size, _, rest = last.partition(b"\r\n")
    assert int(size, 16) == len(rest) - 2 and rest.startswith(b"event: error")
    assert request.transport.disconnecting and not request.finished


def test_raw_mid_chunk_break_writes_nothing_more():
    _, request, relay, upstream, ends = make(is_sse=True, raw=True)
    relay.dataReceived(b"20\r\ndata: half")
    upstream.at_chunk_boundary = False
    relay.response_ended("connection lost")
    assert request.body == b"20\r\ndata: half"
    assert request.transport.disconnecting and ends == [UPSTREAM_BROKE]


def openai_document(code, message):
    return json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()


def test_the_sse_error_event_carries_the_document_of_the_clients_shape():
    _, request, relay, _, _ = make(is_sse=True, keepalive=0, error_document=openai_document)
    relay.dataReceived(b"data: 1\n\n")
    relay.response_ended("connection lost")
    assert request.body.startswith(b"data: 1\n\nevent: error\ndata: ")  # at a boundary: no blank line first
    payload = json.loads(request.body.split(b"event: error\ndata: ", 1)[1])
    assert payload["error"]["code"] == UPSTREAM_BROKE and "broke off" in payload["error"]["message"]


def test_an_ndjson_stream_that_breaks_after_a_whole_line_ends_with_an_error_line():
    _, request, relay, _, ends = make(ndjson=True)
    relay.dataReceived(b'{"response": "a", "done": false}\n')
    relay.response_ended("connection lost")
    lines = request.body.split(b"\n")
    assert json.loads(lines[1]) == {"error": "the node's response broke off (connection lost)",
                                    "code": UPSTREAM_BROKE}
    assert lines[2:] == [b""] and request.transport.disconnecting and ends == [UPSTREAM_BROKE]


def test_an_idle_ndjson_stream_says_so_in_an_error_line_on_raw_chunks_too():
    clock, request, relay, _, ends = make(raw=True, ndjson=True, idle=5.0, keepalive=0,
                                          error_document=lambda code, message: b'{"error": "%s"}' % code.encode())
    relay.dataReceived(b"3\r\n{}\n\r\n")
    clock.advance(5)
    assert request.written[-1] == b"1a\r\n{\"error\": \"idle_timeout\"}\n\r\n"
    assert ends == [IDLE_TIMEOUT]


def test_an_ndjson_stream_broken_mid_line_is_only_cut():
    _, request, relay, _, _ = make(ndjson=True)
    relay.dataReceived(b'{"response": "a", "do')
    relay.response_ended("connection lost")
    assert request.body == b'{"response": "a", "do' and request.transport.disconnecting
