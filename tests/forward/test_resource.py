"""The forwarding engine's timeouts and refusals, driven by a MemoryReactorClock (no sockets)."""

import io
import json

import attrs
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.config import NodeSpec, Settings
from blyanproxy.tap import build_proxy


class Request(DummyRequest):
    """A DummyRequest with the few extras the proxy reads."""

    def __init__(self, uri: bytes, method: bytes = b"GET", body: bytes = b""):
        super().__init__([part for part in uri.split(b"?")[0].split(b"/")[1:]])
        self.uri = uri
        self.method = method
        self.content = io.BytesIO(body)
        self.channel = object()  # connected, as far as the relay can tell

    def isSecure(self):
        return False

    @property
    def code(self):
        return self.responseCode or 200

    @property
    def sentLength(self):
        return sum(len(part) for part in self.written)

    def registerProducer(self, producer, streaming):
        # DummyRequest drives a producer in a loop until it unregisters; the relay pushes.
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    @property
    def body(self):
        return json.loads(b"".join(self.written))


def proxy_on(reactor, *urls, **overrides):
    nodes = tuple(NodeSpec(name=f"n{i}", base_url=u, source="t") for i, u in enumerate(urls))
    parts = build_proxy(attrs.evolve(Settings(), nodes=nodes, **overrides), reactor, persist=False)
    return parts.site.resource, parts.registry


def render(root, request):
    resource = root.getChildWithDefault(request.postpath.pop(0), request)
    resource.render(request)
    return request


def fail_connect(reactor, index, exception):
    """Make the index-th connection attempt fail as the reactor would."""
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(exception))
    reactor.advance(0.5)  # HostnameEndpoint reports once its attempt loop has ended


def test_connect_timeout_is_504_after_every_attempt():
    reactor = MemoryReactorClock()
    root, registry = proxy_on(reactor, "http://10.1.1.1:8000", "http://10.1.1.2:8001", connect_timeout=4.5)
    request = render(root, Request(b"/v1/models"))
    assert [(c[1], c[3]) for c in reactor.tcpClients] == [(8000, 4.5)]  # the timeout reaches connect
    fail_connect(reactor, 0, error.TimeoutError())
    assert [(c[1], c[3]) for c in reactor.tcpClients] == [(8000, 4.5), (8001, 4.5)]  # failed over
    fail_connect(reactor, 1, error.TimeoutError())
    assert request.responseCode == 504
    assert request.body["error"] == {"message": "connecting to the node timed out", "type": "server_error",
                                     "param": None, "code": "upstream_timeout"}  # /v1: OpenAI's shape
    assert [registry.stats(n.id).last_failure for n in registry.nodes()] == ["connect_timeout"] * 2
    assert all(registry.stats(n.id).in_flight == 0 for n in registry.nodes())


def test_response_header_timeout_is_504():
    reactor = MemoryReactorClock()
    root, registry = proxy_on(reactor, "http://10.1.1.1:8000", proxy_timeout=30.0, connect_timeout=5.0)
    request = render(root, Request(b"/v1/models"))
    host, port, factory, _, _ = reactor.tcpClients[0]
    from twisted.internet.testing import StringTransport

    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    reactor.advance(29)
    assert transport.value().startswith(b"GET /v1/models HTTP/1.1")
    assert not request.finished
    reactor.advance(2)
    assert request.responseCode == 504
    assert request.body["error"]["code"] == "upstream_timeout"
    assert registry.stats(registry.nodes()[0].id).last_failure == "response_timeout"


def test_client_leaving_before_the_answer_cancels_the_attempt():
    reactor = MemoryReactorClock()
    root, registry = proxy_on(reactor, "http://10.1.1.1:8000")
    request = render(root, Request(b"/v1/models"))
    node = registry.nodes()[0]
    assert registry.stats(node.id).in_flight == 1
    request.processingFailed(Failure(error.ConnectionLost("client gone")))
    assert registry.stats(node.id).in_flight == 0
    assert not reactor.getDelayedCalls() or all(not c.active() for c in reactor.getDelayedCalls())


def test_authority_form_target_is_400():
    reactor = MemoryReactorClock()
    root, _ = proxy_on(reactor, "http://10.1.1.1:8000")
    request = Request(b"/x")
    request.uri = b"evil.example.com:443"
    render(root, request)
    assert request.responseCode == 400
    assert reactor.tcpClients == []


def connect(reactor, index):
    """Complete the index-th connection attempt; returns the protocol and its transport."""
    from twisted.internet.testing import StringTransport

    factory = reactor.tcpClients[index][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_stale_kept_alive_connection_is_retried_once_on_the_same_node():
    reactor = MemoryReactorClock()
    root, registry = proxy_on(reactor, "http://10.1.1.1:8000", "http://10.1.1.2:8000")
    first = render(root, Request(b"/a"))
    protocol, transport = connect(reactor, 0)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert first.written == [b"ok"] and first.finished
    # The rotation now points at the second node; take it out so the first is picked again.
    second_node = registry.nodes()[1]
    registry.remove(second_node.id)
    request = render(root, Request(b"/b"))
    assert len(reactor.tcpClients) == 1  # the kept-alive connection was reused
    protocol.connectionLost(Failure(error.ConnectionDone()))  # the node had closed it meanwhile
    assert len(reactor.tcpClients) == 2  # a fresh connection to the same node
    assert reactor.tcpClients[1][1] == 8000
    fresh, _ = connect(reactor, 1)
    fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
    assert request.written == [b"yes"]
    node = registry.nodes()[0]
    assert registry.stats(node.id).failures == 0
    assert registry.stats(node.id).in_flight == 0


def test_websocket_connect_timeout_tries_the_next_node_once():
    reactor = MemoryReactorClock()
    root, registry = proxy_on(reactor, "http://10.1.1.1:8000", "http://10.1.1.2:8001", proxy_timeout=1.0)
    request = Request(b"/ws")
    request.clientproto = b"HTTP/1.1"
    request.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
    request.requestHeaders.setRawHeaders(b"connection", [b"Upgrade"])
    render(root, request)
    assert [c[1] for c in reactor.tcpClients] == [8000]
    reactor.advance(1.1)
    assert [c[1] for c in reactor.tcpClients] == [8000, 8001]  # one new attempt, no more
    first, second = registry.nodes()
    assert registry.stats(first.id).last_failure == "connect_timeout"
    assert (registry.stats(first.id).in_flight, registry.stats(second.id).in_flight) == (0, 1)
    request.processingFailed(Failure(error.ConnectionLost("client gone")))
    assert registry.stats(second.id).in_flight == 0
    assert registry.stats(second.id).failures == 0


def test_an_attempt_waiting_on_a_node_that_is_ejected_fails_over_at_once():
    reactor = MemoryReactorClock()
    root, registry = proxy_on(reactor, "http://10.1.1.1:8000", "http://10.1.1.2:8001", proxy_timeout=600.0)
    waiting = render(root, Request(b"/v1/chat/completions", b"POST", b"{}"))
    _, transport = connect(reactor, 0)
    assert transport.value().startswith(b"POST /v1/chat/completions HTTP/1.1")  # sent; the node says nothing
    connecting = render(root, Request(b"/v1/models"))  # another request, still connecting to the same node
    assert [c[1] for c in reactor.tcpClients] == [8000, 8000]
    other = render(root, Request(b"/v1/models"))
    fail_connect(reactor, 2, error.ConnectionRefusedError())  # a third request's attempt ejects the node
    assert transport.disconnected  # the waiting attempt's connection is dropped ...
    assert [c[1] for c in reactor.tcpClients][3:] == [8001, 8001, 8001]  # ... and every attempt goes on
    for index in (3, 4, 5):
        protocol, _ = connect(reactor, index)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    for request in (waiting, connecting, other):
        assert request.code == 200 and request.written == [b"ok"]  # from the second node
        assert request.responseHeaders.getRawHeaders(b"x-blyan-node") == [b"n1"]
    first, second = registry.nodes()
    assert registry.stats(first.id).in_flight == 0 and registry.stats(second.id).in_flight == 0
    figures = [(registry.stats(n.id).failures, registry.stats(n.id).last_failure) for n in (first, second)]
    reactor.advance(601)  # a PROXY_TIMEOUT left set by any of those attempts would fire now
    assert [(registry.stats(n.id).failures, registry.stats(n.id).last_failure) for n in (first, second)] == figures
    assert [request.code for request in (waiting, connecting, other)] == [200, 200, 200]


def test_a_websocket_handshake_waiting_on_a_node_that_goes_down_fails_over():
    reactor = MemoryReactorClock()
    root, registry = proxy_on(reactor, "http://10.1.1.1:8000", "http://10.1.1.2:8001", proxy_timeout=600.0)
    request = Request(b"/ws")
    request.clientproto = b"HTTP/1.1"
    request.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
    request.requestHeaders.setRawHeaders(b"connection", [b"Upgrade"])
    render(root, request)
    _, transport = connect(reactor, 0)
    assert transport.value().startswith(b"GET /ws HTTP/1.1")
    other = render(root, Request(b"/v1/models"))
    fail_connect(reactor, 1, error.ConnectionRefusedError())  # the node is ejected
    assert transport.disconnected
    assert [c[1] for c in reactor.tcpClients] == [8000, 8000, 8001, 8001]
    first, second = registry.nodes()
    assert registry.stats(first.id).in_flight == 0 and registry.stats(second.id).in_flight == 2
    other.processingFailed(Failure(error.ConnectionLost("client gone")))
    request.processingFailed(Failure(error.ConnectionLost("client gone")))
    assert registry.stats(second.id).in_flight == 0


def test_a_finished_exchange_leaves_no_cycle_for_the_garbage_collector():
    import gc

    from blyanproxy.forward.exchange import Exchange
    from blyanproxy.forward.failover import Failover
    from blyanproxy.forward.relay import BodyRelay

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for answered in (True, False):  # an answer relayed, and a node that refused (a proxy each)
            reactor = MemoryReactorClock()
            root, _ = proxy_on(reactor, "http://10.1.1.1:8000")
            request = render(root, Request(b"/v1/chat/completions", b"POST", b"{}"))
            if answered:
                protocol, _ = connect(reactor, 0)
                protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                assert request.written == [b"ok"]
            else:
                fail_connect(reactor, 0, error.ConnectionRefusedError())
                assert request.code == 502
            del request
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Exchange, Failover, BodyRelay))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []  # freed by reference counting the moment the exchange ended
