"""The upstream connection and its pool: keep-alive, framing in practice, flow control, no sockets."""

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from blyanproxy.upstream.client import UpstreamPool
from blyanproxy.upstream.http11 import ProtocolError, serialize_request_head


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

    def connects_directly(self, scheme, host):
        return False

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


def test_chunked_with_content_length_is_not_kept_alive():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n")
    assert conn.transport.disconnecting



class EventReceiver(Receiver):
    """A Receiver that also notes a failed request in a shared list of events."""

    def __init__(self, events):
        super().__init__()
        self._events = events

    def request_failed(self, reason):
        super().request_failed(reason)
        self._events.append("request failed")


def test_close_aborts_idle_and_busy_connections_and_fires_once_all_are_closed():
    _, endpoints, pool = make_pool()
    idle, busy = connected(pool, endpoints), connected(pool, endpoints)
    send(idle)
    idle.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    events = []
    busy.request(b"GET", serialize_request_head(b"GET", b"/x", [(b"Host", [b"n"])]), b"", EventReceiver(events))
    closed = pool.close()
    closed.addCallback(lambda _: events.append("closed"))
    assert idle.transport.disconnected and busy.transport.disconnected  # aborted, not closed gently
    idle.connectionLost(Failure(ConnectionLost()))
    assert events == []  # one connection is still open
    busy.connectionLost(Failure(ConnectionLost()))
    assert events == ["request failed", "closed"]  # its receiver is told before close() fires


def test_a_raw_chunked_body_loses_the_nodes_chunk_extensions_and_trailers():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)

    class Raw(Receiver):
        def response_started(self, status, reason, headers, length):
            super().response_started(status, reason, headers, length)
            conn.pass_chunks_raw()

    receiver = Raw()
    conn.request(b"GET", serialize_request_head(b"GET", b"/x", [(b"Host", [b"n"])]), b"", receiver)
    conn.dataReceived(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext="a\rb"\r\nhello\r\n6 ; q\r\n wor')
    conn.dataReceived(b'ld\r\n0;last\r\nX-Bad: \x01\r\nX-Ok: 1\r\n\r\n')
    assert receiver.body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert receiver.ended == [None]
    assert connected(pool, endpoints) is conn  # the framing was sound: the connection is reused


def test_a_101_to_a_request_that_asked_for_no_upgrade_fails_and_the_connection_is_never_reused():
    _, endpoints, pool = make_pool()
    conn = connected(pool, endpoints)
    receiver = send(conn)
    conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\ntunnel")
    assert receiver.head is None and receiver.body == b""
    [reason] = receiver.failed
    assert isinstance(reason, ProtocolError)
    assert conn.transport.disconnected  # aborted, not closed politely: nothing more goes over it
    assert len(endpoints.connects) == 1
    connected(pool, endpoints)
    assert len(endpoints.connects) == 2  # the next request gets a new connection


def direct_pool():
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.client import BrowserLikePolicyForHTTPS

    from blyanproxy.upstream import NodeEndpoints

    reactor = MemoryReactorClock()
    return reactor, UpstreamPool(reactor, NodeEndpoints(reactor, BrowserLikePolicyForHTTPS(), 5.0), 4, 4.0)


def test_a_node_at_an_address_is_connected_to_without_an_endpoint_and_fires_once_connected():
    reactor, pool = direct_pool()
    results = []
    pool.connection("http", "127.0.0.1", 8000).addCallback(results.append)
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 8000, 5.0) and results == []
    conn = factory.buildProtocol(None)
    assert results == []  # not before the connection is made
    conn.makeConnection(StringTransport())
    assert results == [conn]
    receiver = send(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert receiver.body == b"ok" and receiver.ended == [None]
    assert connected_again(pool) is conn  # kept alive, reused


def connected_again(pool):
    results = []
    pool.connection("http", "127.0.0.1", 8000).addCallback(results.append)
    return results[0]


def test_a_direct_connection_that_fails_or_is_cancelled_reports_once():
    from twisted.internet.error import ConnectionRefusedError

    reactor, pool = direct_pool()
    failures = []
    pool.connection("http", "127.0.0.1", 8000).addErrback(failures.append)
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert [f.type for f in failures] == [ConnectionRefusedError]

    cancelled = []
    pending = pool.connection("http", "127.0.0.1", 8000)
    pending.addErrback(cancelled.append)
    pending.cancel()
    connector = reactor.connectors[1]
    assert connector.stoppedConnecting
    reactor.tcpClients[1][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    assert [f.type for f in cancelled] == [defer.CancelledError]  # and no second report


def test_a_named_or_tls_node_still_goes_through_an_endpoint():
    from blyanproxy.upstream import NodeEndpoints

    endpoints = NodeEndpoints(None, None, 5.0)
    assert endpoints.connects_directly("http", "10.0.0.1") and endpoints.connects_directly("http", "::1")
    assert not endpoints.connects_directly("https", "10.0.0.1")
    assert not endpoints.connects_directly("http", "gpu-a.internal")
