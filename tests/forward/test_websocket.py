"""WebSocket forwarding without sockets: the proxy's real site on StringTransports and a MemoryReactorClock.

The client speaks to the site's protocol; each node connection the proxy opens
shows up in ``reactor.tcpClients`` and is completed by hand.
"""

import re

import attrs
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.config import NodeSpec, Settings
from blyanproxy.forward.websocket import is_websocket_upgrade
from blyanproxy.tap import build_proxy

UPGRADE = (b"GET /ws/echo HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
#: RFC 6455's own example: this key's accept value.
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n")


@attrs.define
class Proxy:
    reactor: MemoryReactorClock
    parts: object

    @property
    def nodes(self):
        return self.parts.registry.nodes()

    def stats(self, index):
        return self.parts.registry.stats(self.nodes[index].id)

    def client(self, data=UPGRADE):
        """A client connection to the proxy that has sent ``data``."""
        protocol = self.parts.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        return protocol, transport

    def node(self, index):
        """Complete the proxy's index-th connection to a node: its protocol and transport."""
        protocol = self.reactor.tcpClients[index][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def proxy_on(*urls, **overrides):
    reactor = MemoryReactorClock()
    nodes = tuple(NodeSpec(name=f"n{i}", base_url=u, source="t") for i, u in enumerate(urls))
    settings = attrs.evolve(Settings(), nodes=nodes, **overrides)
    return Proxy(reactor, build_proxy(settings, reactor, persist=False))


def lost(protocol, reason=error.ConnectionDone):
    protocol.connectionLost(Failure(reason()))


def test_is_websocket_upgrade():
    def request(method=b"GET", proto=b"HTTP/1.1", upgrade=b"websocket"):
        r = DummyRequest([b"ws"])
        r.method, r.clientproto = method, proto
        if upgrade is not None:
            r.requestHeaders.setRawHeaders(b"upgrade", [upgrade])
        return r

    assert is_websocket_upgrade(request())
    assert is_websocket_upgrade(request(upgrade=b"WebSocket"))
    assert not is_websocket_upgrade(request(method=b"POST"))
    assert not is_websocket_upgrade(request(proto=b"HTTP/1.0"))
    assert not is_websocket_upgrade(request(upgrade=None))
    assert not is_websocket_upgrade(request(upgrade=b"h2c"))


def test_the_handshake_goes_to_the_node_and_the_sockets_are_spliced(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000")
    client, client_transport = proxy.client()
    node, node_transport = proxy.node(0)
    head = node_transport.value()
    assert head.startswith(b"GET /ws/echo HTTP/1.1\r\n")
    assert b"Upgrade: websocket" in head and b"Connection: Upgrade" in head and b"Host: 10.1.1.1:8000" in head
    node.dataReceived(SWITCHING + b"early")
    answer = client_transport.value()
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert re.search(rb"\r\nX-Blyan-Node: n0\r\nX-Request-Id: [0-9a-f]{32}\r\n\r\nearly", answer)
    request_id = re.search(rb"X-Request-Id: ([0-9a-f]+)", answer).group(1)
    assert b"\r\nX-Request-Id: " + request_id + b"\r\n" in head  # the node got the same id
    client_transport.clear()
    node_transport.clear()

    client.dataReceived(b"frame from the client")
    node.dataReceived(b"frame from the node")
    assert node_transport.value() == b"frame from the client"
    assert client_transport.value() == b"frame from the node"
    assert proxy.stats(0).in_flight == 1
    assert access_lines == []  # an open WebSocket has no line yet

    lost(client)
    assert node_transport.disconnecting
    assert proxy.stats(0).in_flight == 0
    assert access_lines == [access_lines[0]]
    assert access_lines[0].startswith("192.0.2.7 GET /ws/echo status=101 node=n0 attempts=1 ttfb_ms=")
    assert " bytes_in=21 bytes_out=24 ended=client_closed request_id=" in access_lines[0]


def test_the_node_closing_closes_the_client(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000")
    client, client_transport = proxy.client()
    node, _ = proxy.node(0)
    node.dataReceived(SWITCHING)
    lost(node)
    assert client_transport.disconnecting
    lost(client)  # the client's side then goes too: still one line
    assert len(access_lines) == 1 and " ended=node_closed request_id=" in access_lines[0]
    assert proxy.stats(0).in_flight == 0


def test_a_refusal_is_relayed_as_a_response(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000")
    _, client_transport = proxy.client()
    node, node_transport = proxy.node(0)
    node.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\nno ")
    node.dataReceived(b"way")
    response = client_transport.value()
    assert response.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"X-Blyan-Node: n0" in response and response.endswith(b"\r\n\r\nno way")
    assert node_transport.disconnecting
    assert proxy.stats(0).in_flight == 0 and proxy.stats(0).failures == 0
    assert " bytes_out=6 ended=complete request_id=" in access_lines[-1] and " status=401 " in access_lines[-1]


def test_a_refusal_cut_short_reads_as_broken(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000")
    _, client_transport = proxy.client()
    node, _ = proxy.node(0)
    node.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\npartial")
    lost(node, error.ConnectionLost)
    assert client_transport.disconnecting
    assert " ended=upstream_broke request_id=" in access_lines[-1] and " status=403 " in access_lines[-1]
    assert proxy.stats(0).in_flight == 0


def test_a_malformed_handshake_answer_is_502_without_failover(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000", "http://10.1.1.2:8000")
    _, client_transport = proxy.client()
    node, node_transport = proxy.node(0)
    node.dataReceived(b"SPLAT\r\n\r\n")
    assert node_transport.disconnected
    assert len(proxy.reactor.tcpClients) == 1
    assert client_transport.value().startswith(b"HTTP/1.1 502 ")
    assert b'"code": "upstream_failed"' in client_transport.value()
    assert proxy.stats(0).last_failure == "bad_handshake" and proxy.stats(0).in_flight == 0
    assert " status=502 " in access_lines[-1] and " ended=error request_id=" in access_lines[-1]


def test_any_answer_goes_to_the_client_even_a_retry_status():
    proxy = proxy_on("http://10.1.1.1:8000", "http://10.1.1.2:8001")
    _, client_transport = proxy.client()
    node, node_transport = proxy.node(0)
    node.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    assert client_transport.value().startswith(b"HTTP/1.1 503 ")
    assert len(proxy.reactor.tcpClients) == 1
    assert proxy.stats(0).failures == 0 and proxy.stats(0).in_flight == 0


def test_a_node_that_cannot_be_reached_is_failed_over():
    proxy = proxy_on("http://10.1.1.1:8000", "http://10.1.1.2:8001")
    _, client_transport = proxy.client()
    factory = proxy.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(proxy.reactor.connectors[0], Failure(error.ConnectionRefusedError()))
    assert [c[1] for c in proxy.reactor.tcpClients] == [8000, 8001]
    node, _ = proxy.node(1)
    node.dataReceived(SWITCHING)
    assert client_transport.value().startswith(b"HTTP/1.1 101 ")
    assert proxy.stats(0).last_failure == "refused" and proxy.stats(0).in_flight == 0
    assert proxy.stats(1).in_flight == 1


def test_a_node_silent_past_the_timeout_is_504_naming_the_upgrade(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000", proxy_timeout=2.0)
    _, client_transport = proxy.client()
    node, node_transport = proxy.node(0)
    proxy.reactor.advance(1.9)
    assert not node_transport.disconnected
    proxy.reactor.advance(0.2)
    assert node_transport.disconnected
    lost(node, error.ConnectionAborted)  # what the reactor reports after the abort
    assert client_transport.value().startswith(b"HTTP/1.1 504 ")
    assert b"the node did not answer the upgrade in time" in client_transport.value()
    assert proxy.stats(0).last_failure == "response_timeout"
    assert " ended=timeout request_id=" in access_lines[-1]


def test_a_client_leaving_before_the_answer_is_499_and_frees_the_node(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000")
    client, _ = proxy.client()
    node, node_transport = proxy.node(0)
    lost(client)
    assert node_transport.disconnected
    lost(node, error.ConnectionAborted)
    assert proxy.stats(0).in_flight == 0 and proxy.stats(0).failures == 0
    assert " status=499 " in access_lines[-1] and " ended=client_gone request_id=" in access_lines[-1]


def test_a_refusal_ended_by_the_close_is_relayed_whole(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000")
    _, client_transport = proxy.client()
    node, _ = proxy.node(0)
    node.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnot ")
    node.dataReceived(b"here")
    lost(node)
    response = client_transport.value()
    assert response.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert response.endswith(b"\r\n0\r\n\r\n")  # chunked to the client, and complete
    assert " bytes_out=8 ended=complete request_id=" in access_lines[-1]
    assert proxy.stats(0).in_flight == 0


def test_a_node_closing_before_its_answer_is_failed_over_with_a_deadline_of_its_own():
    proxy = proxy_on("http://10.1.1.1:8000", "http://10.1.1.2:8001", proxy_timeout=2.0, retry_delay=0.0)
    _, client_transport = proxy.client()
    first, _ = proxy.node(0)
    proxy.reactor.advance(1.5)
    lost(first)  # accepted, then closed without a word
    assert [c[1] for c in proxy.reactor.tcpClients] == [8000, 8001]
    assert proxy.stats(0).last_failure == "no_response"
    proxy.reactor.advance(1.0)  # past the first attempt's deadline, not the second's
    second, second_transport = proxy.node(1)
    assert not second_transport.disconnected
    second.dataReceived(SWITCHING)
    assert client_transport.value().startswith(b"HTTP/1.1 101 ")
    assert proxy.stats(1).failures == 0 and proxy.stats(1).in_flight == 1


def test_a_client_leaving_while_the_node_is_connecting_frees_the_node(access_lines):
    proxy = proxy_on("http://10.1.1.1:8000")
    client, _ = proxy.client()
    assert proxy.stats(0).in_flight == 1
    lost(client)
    assert proxy.stats(0).in_flight == 0 and proxy.stats(0).failures == 0
    assert " status=499 " in access_lines[-1] and " ended=client_gone request_id=" in access_lines[-1]
    assert not proxy.reactor.getDelayedCalls()


def head_lines(answer):
    return answer.partition(b"\r\n\r\n")[0].split(b"\r\n")


def test_the_nodes_101_head_is_filtered_like_any_response_head():
    proxy = proxy_on("http://10.1.1.1:8000")
    _, client_transport = proxy.client()
    node, _ = proxy.node(0)
    node.dataReceived(b"HTTP/1.1 101 Whatever\r\nupgrade: WebSocket\r\nConnection: keep-alive, Upgrade, X-Hop\r\n"
                      b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\nSec-WebSocket-Protocol: chat\r\n"
                      b"X-Blyan-Node: forged\r\nX-Blyan-Attempts: 9\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
                      b"Proxy-Agent: x\r\nSet-Cookie: a=1\r\n\r\nframe")
    answer = client_transport.value()
    lines = head_lines(answer)
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert [line for line in lines[1:] if line.startswith(b"X-Request-Id: ")]  # the proxy's id is on it
    assert sorted(line for line in lines[1:] if not line.startswith(b"X-Request-Id: ")) == sorted([
        b"Sec-WebSocket-Accept: " + ACCEPT, b"Sec-WebSocket-Protocol: chat", b"Set-Cookie: a=1",
        b"Upgrade: websocket", b"Connection: Upgrade", b"X-Blyan-Node: n0"])
    assert answer.endswith(b"\r\n\r\nframe")


BAD_SWITCHES = {
    "no accept": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "wrong accept": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    "two accepts": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\nSec-WebSocket-Accept: x\r\n\r\n",
    "another protocol": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n",
    "no upgrade": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n",
    "no connection": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n",
}


def test_a_101_that_is_not_a_websocket_handshake_for_this_key_is_502(access_lines):
    for why, answer in BAD_SWITCHES.items():
        proxy = proxy_on("http://10.1.1.1:8000")
        client, client_transport = proxy.client()
        node, node_transport = proxy.node(0)
        node.dataReceived(answer + b"tunnelled bytes")
        assert client_transport.value().startswith(b"HTTP/1.1 502 "), why
        assert b"tunnelled" not in client_transport.value(), why
        assert node_transport.disconnected, why
        assert proxy.stats(0).last_failure == "bad_handshake" and proxy.stats(0).in_flight == 0, why
        assert " status=502 " in access_lines[-1], why
        client.dataReceived(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"GET /next" not in node_transport.value(), why  # the client's bytes never reach the node raw
        assert len(proxy.reactor.tcpClients) == 2, why  # the next request is an HTTP request of its own


def test_a_client_upgrade_without_a_key_cannot_be_spliced():
    proxy = proxy_on("http://10.1.1.1:8000")
    _, client_transport = proxy.client(UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""))
    node, _ = proxy.node(0)
    node.dataReceived(SWITCHING)
    assert client_transport.value().startswith(b"HTTP/1.1 502 ")
