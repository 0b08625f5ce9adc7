"""The upstream HTTP/1.1 client: parsing, framing, keep-alive and the pool, without sockets."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from blyanproxy.client import (
    ChunkedBody,
    ProtocolError,
    UpstreamConnection,
    UpstreamPool,
    body_framing,
    parse_head,
    serialize_request_head,
)


class Receiver:
    """Records what a connection reports."""

    def __init__(self):
        self.head = None
        self.body = b""
        self.ended = []
        self.failed = []

    def response_started(self, status, reason, headers, length):
        self.head = (status, reason, headers, length)

    def body_data(self, data):
        self.body += data

    def response_ended(self, error):
        self.ended.append(error)

    def request_failed(self, reason):
        self.failed.append(reason)


class FakeEndpoints:
    """Endpoints whose connections are made by hand in the test."""

    def __init__(self):
        self.connects = []

    def endpoint(self, scheme, host, port):
        test = self

        class Endpoint:
            def connect(self, factory):
                d = defer.Deferred()
                test.connects.append((factory, d))
                return d

        return Endpoint()

    def complete(self, index=-1):
        factory, d = self.connects[index]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport


def make_pool(max_idle=4, idle_timeout=4.0):
    clock, endpoints = Clock(), FakeEndpoints()
    return clock, endpoints, UpstreamPool(clock, endpoints, max_idle, idle_timeout)


def connected(pool, endpoints):
    results = []
    pool.connection("http", "127.0.0.1", 8000).addCallback(results.append)
    if not results:
        endpoints.complete()
    return results[0]


def send(conn, method=b"GET"):
    receiver = Receiver()
    conn.request(method, serialize_request_head(method, b"/x", [(b"Host", [b"n"])]), b"", receiver)
    return receiver


def test_serialize_request_head():
    head = serialize_request_head(b"POST", b"/a%2Fb?q", [(b"Host", [b"n:1"]), (b"X-M", [b"1", b"2"])])
    assert head == b"POST /a%2Fb?q HTTP/1.1\r\nHost: n:1\r\nX-M: 1\r\nX-M: 2\r\n\r\n"


def test_parse_head_groups_repeats():
    status, reason, headers = parse_head(b"HTTP/1.1 200 OK\r\nSet-Cookie: a\r\nX: 1\r\nset-cookie: b")
    assert (status, reason) == (200, b"OK")
    assert headers == [(b"Set-Cookie", [b"a", b"b"]), (b"X", [b"1"])]


@pytest.mark.parametrize("head", [b"HTTP/2 200", b"nonsense", b"HTTP/1.1 abc", b"HTTP/1.1 200 OK\r\nNoColon",
                                  b"HTTP/1.1 200 OK\r\nX: 1\r\n folded", b"HTTP/1.1 200 OK\r\nBad : 1"])
def test_parse_head_refuses_malformed(head):
    with pytest.raises(ProtocolError):
        parse_head(head)


@pytest.mark.parametrize(
    "method, status, headers, expected",
    [
        (b"HEAD", 200, [(b"Content-Length", [b"10"])], ("none", 0)),
        (b"GET", 204, [], ("none", 0)),
        (b"GET", 304, [(b"Content-Length", [b"10"])], ("none", 0)),
        (b"GET", 200, [(b"Transfer-Encoding", [b"chunked"]), (b"Content-Length", [b"3"])], ("chunked", None)),
        (b"GET", 200, [(b"Transfer-Encoding", [b"gzip"])], ("close", None)),
        (b"GET", 200, [(b"Content-Length", [b"10", b"10"])], ("length", 10)),
        (b"GET", 200, [], ("close", None)),
    ],
)
def test_body_framing(method, status, headers, expected):
    assert body_framing(method, status, b"HTTP/1.1", headers) == expected


@pytest.mark.parametrize("values", [[b"10", b"11"], [b"-1"], [b"1e3"]])
def test_bad_content_length_is_a_protocol_error(values):
    with pytest.raises(ProtocolError):
        body_framing(b"GET", 200, b"HTTP/1.1", [(b"Content-Length", values)])


def feed_in_pieces(encoded, cuts, decode):
    """Feed ``encoded`` cut into pieces; returns (collected data or raw bytes, end found, what follows)."""
    body, collected, position = ChunkedBody(), [], 0
    for cut in cuts + [len(encoded)]:
        piece = encoded[position:position + cut]
        end = body.feed(piece, collected if decode else None)
        if end != -1:
            if not decode:
                collected.append(piece[:end])
            return b"".join(collected), True, piece[end:] + encoded[position + len(piece):]
        if not decode:
            collected.append(piece)
        position += len(piece)
    return b"".join(collected), False, b""


chunk_lists = st.lists(st.binary(min_size=1, max_size=50), max_size=6)
cut_lists = st.lists(st.integers(1, 40), max_size=20)


def encode(chunks, extension=b""):
    return b"".join(b"%x%s\r\n%s\r\n" % (len(c), extension, c) for c in chunks) + b"0\r\nX-T: 1\r\n\r\n"


@given(chunk_lists, cut_lists)
def test_chunked_body_decodes_any_split(chunks, cuts):
    data, done, rest = feed_in_pieces(encode(chunks, b";ext=1") + b"NEXT", cuts, decode=True)
    assert done and data == b"".join(chunks) and rest == b"NEXT"


@given(chunk_lists, cut_lists)
def test_chunked_body_finds_the_end_of_raw_bytes(chunks, cuts):
    encoded = encode(chunks)
    raw, done, rest = feed_in_pieces(encoded + b"NEXT", cuts, decode=False)
    assert done and raw == encoded and rest == b"NEXT"


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-5\r\nabc", b"5\r\nabcdeXX", b"0x5\r\n", b"1_0\r\n",
                                 b"5\nabcde", b"+5\r\n"])
def test_chunked_body_refuses_malformed(bad):
    with pytest.raises(ProtocolError):
        ChunkedBody().feed(bad, [])


def test_length_body_then_reuse():
    clock, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    assert conn.transport.value() == b"GET /x HTTP/1.1\r\nHost: n\r\n\r\n"
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    assert receiver.head[0] == 200 and receiver.head[3] == 5
    assert receiver.ended == []
    conn.dataReceived(b"lo")
    assert receiver.body == b"hello" and receiver.ended == [None]
    again = connected(pool, endpoints)
    assert again is conn and again.reused
    assert len(endpoints.connects) == 1


def test_interim_100_continue_is_skipped():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn, b"POST")
    conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert receiver.head[0] == 201 and receiver.ended == [None]


def test_chunked_body_and_keep_alive():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert receiver.body == b"hello" and receiver.head[3] is None
    conn.dataReceived(b"6\r\n world\r\n0\r\n\r\n")
    assert receiver.body == b"hello world" and receiver.ended == [None]
    assert connected(pool, endpoints) is conn


def test_connection_close_is_not_reused():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert receiver.ended == [None]
    assert conn.transport.disconnecting
    conn.connectionLost(Failure(ConnectionDone()))
    assert connected(pool, endpoints) is not conn


def test_close_delimited_body_completes_on_close():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nsome")
    conn.dataReceived(b" more")
    conn.connectionLost(Failure(ConnectionDone()))
    assert receiver.body == b"some more" and receiver.ended == [None]


def test_cut_body_reports_an_error():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.connectionLost(Failure(ConnectionLost()))
    assert receiver.ended and receiver.ended[0] is not None


def test_no_head_reports_request_failed():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.connectionLost(Failure(ConnectionLost()))
    assert len(receiver.failed) == 1 and receiver.head is None


def test_malformed_head_fails_and_drops_the_connection():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.dataReceived(b"SMTP ready\r\n\r\n")
    assert isinstance(receiver.failed[0], ProtocolError)
    assert conn.transport.disconnected or conn.transport.disconnecting


def test_oversized_head_fails():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000)
    assert isinstance(receiver.failed[0], ProtocolError)


def test_head_request_has_no_body_even_with_a_length():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn, b"HEAD")
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert receiver.ended == [None]
    assert connected(pool, endpoints) is conn


def test_extra_bytes_after_a_response_mean_no_reuse():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE")
    assert conn.transport.disconnecting
    assert connected(pool, endpoints) is not conn


def test_pool_keeps_at_most_max_idle_and_expires_them():
    clock, endpoints, pool = make_pool(max_idle=1, idle_timeout=4.0)
    first = connected(pool, endpoints)
    second = connected(pool, endpoints)
    for conn in (first, second):
        send(conn)
        conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert first.transport.disconnecting is False
    assert second.transport.disconnecting  # over max_idle: closed
    clock.advance(5)
    assert connected(pool, endpoints) is not first  # too old to reuse
    assert first.transport.disconnecting


def test_sweep_closes_old_idle_connections():
    clock, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    send(conn)
    conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    clock.advance(3)
    pool.sweep()
    assert not conn.transport.disconnecting
    clock.advance(2)
    pool.sweep()
    assert conn.transport.disconnecting


def test_fresh_skips_idle_connections():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    send(conn)
    conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    results = []
    pool.connection("http", "127.0.0.1", 8000, fresh=True).addCallback(results.append)
    assert results == [] and len(endpoints.connects) == 2


def test_flow_control_reaches_the_transport():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    conn.pauseProducing()
    assert conn.transport.producerState == "paused"
    conn.resumeProducing()
    assert conn.transport.producerState == "producing"


def test_a_connection_paused_by_a_slow_client_is_resumed_before_it_is_pooled():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    conn.pauseProducing()  # the client's socket filled up
    conn.dataReceived(b"cd")
    assert conn.transport.producerState == "producing"
    assert connected(pool, endpoints) is conn


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX Bad: 1",
        b"HTTP/1.1 200 OK\nSet-Cookie: injected=1",
        b"HTTP/1.1 200 OK\r\nX-A: one\ntwo",
        b"HTTP/1.1 200 OK\r\nX-A: nul\x00",
        b"HTTP/1.1 999 Nope",
    ],
)
def test_heads_that_could_inject_or_break_client_headers_are_refused(head):
    with pytest.raises(ProtocolError):
        parse_head(head)


def test_chunked_with_content_length_is_not_kept_alive():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n")
    assert conn.transport.disconnecting
