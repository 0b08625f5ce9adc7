"""The listening side without sockets: RootResource's dispatch and end hook, ProxyChannel's refusals."""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

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
    assert json.loads(body_of(response)) == {"error": "the request is not valid HTTP/1.1",
                                             "code": "malformed_request"}


def test_a_body_over_the_limit_is_413_before_it_is_read():
    response = exchange(site_with(), b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body_of(response))["code"] == "body_too_large"


def test_transfer_encoding_identity_without_a_body_gets_the_json_400():
    # Twisted reads "identity" as no body at all and completes the request at once: the refusal's
    # stand-in body must behave like a file there (it once had no ``tell``, and the client got nothing).
    response = exchange(site_with(), b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body_of(response))["code"] == "malformed_request"


def test_a_header_value_with_a_control_character_gets_the_json_400():
    for control in (b"\x0b", b"\x0c", b"\x1b", b"\x7f", b"\x01"):
        response = exchange(site_with(), b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a" + control + b"b\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 400 "), control
        assert json.loads(body_of(response))["code"] == "malformed_request"
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
