"""The listening side without sockets: RootResource's dispatch and end hook, ProxyChannel's refusals."""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from blyanproxy.forward import TrafficRecorder
from blyanproxy.serve import ProxySite, RootResource


class Answer(Resource):
    """A leaf answering its name, as the proxy's own endpoints and the forwarder do."""

    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.name = name

    def render(self, request):
        return self.name.encode()


def site_with(recorder=None):
    root = RootResource(Answer("forwarder"), prefixes={b"_admin": Answer("admin")},
                        exact={b"health": Answer("health")}, recorder=recorder)
    return ProxySite(root, max_body_bytes=100, reactor=Clock())


def exchange(site, data):
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return transport.value()


def body_of(response):
    return response.partition(b"\r\n\r\n")[2]


def test_own_paths_are_answered_and_everything_else_is_forwarded():
    site = site_with()
    get = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert body_of(exchange(site, get % b"/health")) == b"health"
    assert body_of(exchange(site, get % b"/_admin/nodes")) == b"admin"
    assert body_of(exchange(site, get % b"/health/x")) == b"forwarder"  # exact paths only
    assert body_of(exchange(site, get % b"/v1/models")) == b"forwarder"
    assert b"\r\nServer:" not in exchange(site, get % b"/health")


def test_the_proxys_own_answers_end_in_the_hook_marked_as_such():
    ended = []
    recorder = TrafficRecorder(Clock())
    recorder.subscribe(ended.append)
    site = site_with(recorder)
    exchange(site, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    exchange(site, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # the forwarder reports its own
    [record] = ended
    assert (record.method, record.target, record.status, record.node, record.ended, record.client) == (
        "GET", b"/health", 200, None, "complete", "192.0.2.7")
    assert record.own_endpoint and record.bytes_out == len(b"health")


def test_a_head_twisted_cannot_parse_gets_the_json_400():
    response = exchange(site_with(), b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")
    body = json.loads(body_of(response))
    assert body == {"error": "the request is not valid HTTP/1.1", "code": "malformed_request",
                    "request_id": body["request_id"]}
    assert b"\r\nX-Request-Id: %s\r\n" % body["request_id"].encode() in response


def test_a_body_over_the_limit_is_413_before_it_is_read():
    response = exchange(site_with(), b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body_of(response))["error"]["code"] == "body_too_large"  # /v1: OpenAI's shape


def test_an_early_refusal_keeps_the_clients_request_id_and_the_shape_of_its_path():
    response = exchange(site_with(), b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-Request-Id: mine-1\r\n"
                                     b"Content-Length: 101\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 413 ") and b"\r\nX-Request-Id: mine-1\r\n" in response
    assert json.loads(body_of(response)) == {"error": "the request body exceeds 100 bytes"}  # Ollama's shape
    response = exchange(site_with(), b"POST /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: has space\r\n"
                                     b"Content-Length: 101\r\n\r\n")
    body = json.loads(body_of(response))
    assert body["code"] == "body_too_large" and len(body["request_id"]) == 32  # replaced: not usable


def test_a_head_too_slow_is_408_in_the_shape_of_the_path_it_named():
    site = site_with()
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
    protocol.makeConnection(transport)
    # (Twisted takes a header line in when the next one starts: it might be continued.)
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nX-Request-Id: slow-1\r\nAccept: */*\r\n")
    site.reactor.advance(30)
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert json.loads(body_of(response)) == {
        "error": {"message": "the request head did not arrive in time", "type": "invalid_request_error",
                  "param": None, "code": "request_timeout"}, "request_id": "slow-1"}


def test_transfer_encoding_identity_without_a_body_gets_the_json_400():
    # Twisted reads "identity" as no body at all and completes the request at once: the refusal's
    # stand-in body must behave like a file there (it once had no ``tell``, and the client got nothing).
    response = exchange(site_with(), b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")
    assert code_of(response) == "malformed_request"


def test_a_header_value_with_a_control_character_gets_the_json_400():
    for control in (b"\x0b", b"\x0c", b"\x1b", b"\x7f", b"\x01"):
        response = exchange(site_with(), b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a" + control + b"b\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 400 "), control
        assert code_of(response) == "malformed_request"
        assert b"forwarder" not in response


def test_a_dot_segment_never_reaches_the_proxys_own_endpoints():
    # nginx resolves /_admin/..%2Fstatus to /status and lets it by; twisted.web would hand it to
    # the admin app. It goes to the forwarder instead, whose route check refuses it (400).
    site = site_with()
    get = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for target in (b"/_admin/..%2Fstatus", b"/_admin/%2e%2e/nodes", b"/_admin/./nodes", b"/_admin/x%5C..%5Cstatus"):
        assert body_of(exchange(site, get % target)) == b"forwarder", target
    assert body_of(exchange(site, get % b"/_admin/nodes")) == b"admin"
    assert body_of(exchange(site, get % b"/%5Fadmin/nodes")) == b"admin"  # as nginx reads it: its allow-list applies


def code_of(response):
    """The error code of a JSON refusal, in the plain shape or OpenAI's (``/v1`` paths)."""
    body = json.loads(body_of(response))
    return body["error"]["code"] if isinstance(body["error"], dict) else body["code"]


def limited_site(clock, **limits):
    root = RootResource(Answer("forwarder"), prefixes={}, exact={})
    return ProxySite(root, max_body_bytes=limits.pop("max_body_bytes", 1000), reactor=clock, **limits)


def connect(site, host="192.0.2.7", port=50000):
    protocol = site.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_body_slower_than_the_body_deadline_gets_408_and_the_connection_closes():
    clock = Clock()
    site = limited_site(clock, body_timeout=2.0)
    protocol, transport = connect(site)
    protocol.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    for _ in range(19):  # a byte every 0.1 s: never idle, never done
        clock.advance(0.1)
        protocol.dataReceived(b"d")
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(0.2)
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 408 ") and transport.disconnecting
    assert code_of(response) == "request_timeout"
    assert b"forwarder" not in response


def test_a_body_within_the_deadline_is_served_and_the_deadline_ends_with_it():
    clock = Clock()
    site = limited_site(clock, body_timeout=2.0)
    protocol, transport = connect(site)
    protocol.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
    clock.advance(1.5)
    protocol.dataReceived(b"cd")
    assert body_of(transport.value()) == b"forwarder"
    clock.advance(5.0)
    assert b"HTTP/1.1 408" not in transport.value() and not transport.disconnecting
    # A chunked body has the same deadline.
    transport.clear()
    protocol.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    clock.advance(2.1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_request_bodies_held_at_once_are_capped_and_released_when_requests_end():
    clock = Clock()
    site = limited_site(clock, max_buffered_bytes=100)
    first, first_transport = connect(site, port=1)
    first.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n" + b"a" * 30)
    second, second_transport = connect(site, port=2)
    second.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n")
    response = second_transport.value()
    assert response.startswith(b"HTTP/1.1 503 ") and second_transport.disconnecting
    assert code_of(response) == "proxy_busy"
    # A chunked body is counted as it arrives, and refused the moment it passes the cap.
    third, third_transport = connect(site, port=3)
    third.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"14\r\n" + b"c" * 20 + b"\r\n")
    assert third_transport.value() == b""
    third.dataReceived(b"1e\r\n" + b"c" * 30 + b"\r\n")
    assert third_transport.value().startswith(b"HTTP/1.1 503 ")
    # The first ends (answered): what it held is free again.
    first.dataReceived(b"a" * 30)
    assert body_of(first_transport.value()) == b"forwarder"
    fourth, fourth_transport = connect(site, port=4)
    fourth.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"d" * 90)
    assert body_of(fourth_transport.value()) == b"forwarder"


def test_a_body_left_unfinished_by_a_vanished_client_is_released():
    from twisted.internet.error import ConnectionLost

    clock = Clock()
    site = limited_site(clock, max_buffered_bytes=100)
    first, _ = connect(site, port=1)
    first.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\nabc")
    first.connectionLost(Failure(ConnectionLost()))
    second, second_transport = connect(site, port=2)
    second.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n" + b"d" * 90)
    assert body_of(second_transport.value()) == b"forwarder"


def test_connections_per_client_address_are_capped():
    from twisted.internet.error import ConnectionDone

    from blyanproxy.core import parse_forward_trust

    clock = Clock()
    site = limited_site(clock, max_connections_per_client=2, unlimited_peers=parse_forward_trust("192.0.2.99"))
    get = b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n"
    open_ = [connect(site, port=port) for port in (1, 2)]
    extra, extra_transport = connect(site, port=3)
    response = extra_transport.value()
    assert response.startswith(b"HTTP/1.1 429 ") and extra_transport.disconnecting
    assert code_of(response) == "too_many_connections"
    extra.dataReceived(get)
    assert b"forwarder" not in extra_transport.value()  # nothing it sends is served
    other, other_transport = connect(site, host="192.0.2.8")  # another address is not held back
    other.dataReceived(get)
    assert body_of(other_transport.value()) == b"forwarder"
    for port in range(10):  # nor is a trusted front proxy, which carries many clients
        front, front_transport = connect(site, host="192.0.2.99", port=port)
        assert front_transport.value() == b""
    open_[0][0].connectionLost(Failure(ConnectionDone()))
    again, again_transport = connect(site, port=4)
    again.dataReceived(get)
    assert body_of(again_transport.value()) == b"forwarder"


class CountingTransport(StringTransport):
    """Counts the writes that reach it: each would be one ``send``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)

    def writeSequence(self, data):
        self.writes += 1
        super().write(b"".join(data))


class Streaming(Resource):
    """A leaf answering with a known length in one write, or streaming in three."""

    isLeaf = True

    def render(self, request):
        if request.path == b"/one":
            request.setHeader(b"content-length", b"5")
            return b"hello"
        request.write(b"")  # the head on its own (a stream announcing itself)
        request.write(b"first")
        request.write(b"second")
        request.finish()
        return NOT_DONE_YET


def tracked_exchange(data):
    from blyanproxy.serve import ConnectionTracker

    tracker = ConnectionTracker(ProxySite(RootResource(Streaming(), prefixes={}, exact={}), 100, reactor=Clock()))
    protocol = tracker.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000))
    transport = CountingTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return transport


def test_the_head_and_the_first_piece_of_the_body_go_out_in_one_write():
    transport = tracked_exchange(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n") and transport.value().endswith(b"\r\n\r\nhello")
    assert transport.writes == 1


def test_a_head_written_alone_goes_out_at_once_and_the_stream_follows_in_order():
    transport = tracked_exchange(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
    assert body == b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"
    assert transport.writes == 4  # the head, two chunks, the last chunk: nothing waits for a later write


class Later(Resource):
    """A leaf that answers some time later (as a forwarded request does)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


def test_a_write_after_the_client_left_is_dropped_as_twisted_drops_it():
    from twisted.internet.error import ConnectionDone

    from blyanproxy.serve import ConnectionTracker

    later = Later()
    tracker = ConnectionTracker(ProxySite(RootResource(later, prefixes={}, exact={}), 100, reactor=Clock()))
    protocol = tracker.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000))
    transport = CountingTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    request = later.requests[0]
    request.write(b"too late")  # no exception, nothing sent
    assert transport.value() == b"" and transport.writes == 0
