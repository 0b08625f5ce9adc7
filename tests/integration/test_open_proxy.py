"""No open proxy: no request target, query parameter or header sends traffic to an unregistered address.

A second "evil" node listens on loopback but is never registered; whatever a
client tries, it must see no connection at all, while the registered node
gets exactly the request the proxy meant to send.
"""

import json

import pytest
import pytest_twisted

from .capture import strict_requests
from .rawhttp import connect, sleep
from .test_admin import AUTH, TOKEN, call


async def exchange(reactor, proxy, raw: bytes) -> bytes:
    """Send raw bytes to the proxy and read everything until it closes."""
    client = await connect(reactor, proxy.url)
    client.transport.write(raw)
    received = await client.wait_closed(timeout=10)
    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_body(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def attempts(evil_hostport: bytes):
    """(request bytes, what the registered node must receive as target, or None for a refusal)."""
    e = evil_hostport
    return [
        (b"GET http://" + e + b"/probe HTTP/1.1\r\nHost: " + e + b"\r\n", b"/probe"),
        (b"GET https://" + e + b"/probe?a=1 HTTP/1.1\r\nHost: x\r\n", b"/probe?a=1"),
        (b"GET http://user@" + e + b"/probe HTTP/1.1\r\nHost: x\r\n", b"/probe"),
        (b"GET /probe HTTP/1.1\r\nHost: " + e + b"\r\n", b"/probe"),
        (b"GET /probe HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: " + e + b"\r\nForwarded: host=" + e
         + b"\r\nX-Real-IP: 127.0.0.1\r\n", b"/probe"),
        (b"GET /probe?target=http://" + e + b"/ HTTP/1.1\r\nHost: x\r\n",
         b"/probe?target=http://" + e + b"/"),
        (b"GET /api/probe?target=http%3A%2F%2F" + e + b" HTTP/1.1\r\nHost: x\r\n",
         b"/probe?target=http%3A%2F%2F" + e),
        (b"GET //" + e + b"/probe HTTP/1.1\r\nHost: x\r\n", b"//" + e + b"/probe"),
        (b"GET /api//" + e + b"/x HTTP/1.1\r\nHost: x\r\n", b"//" + e + b"/x"),
        (b"GET /%2F%2F" + e + b"/x HTTP/1.1\r\nHost: x\r\n", b"/%2F%2F" + e + b"/x"),
        (b"GET /api/http://" + e + b"/x HTTP/1.1\r\nHost: x\r\n", b"/http://" + e + b"/x"),
        (b"CONNECT " + e + b" HTTP/1.1\r\nHost: " + e + b"\r\n", None),
        (b"GET " + e + b"/x HTTP/1.1\r\nHost: x\r\n", None),
        (b"GET @" + e + b"/x HTTP/1.1\r\nHost: x\r\n", None),
        (b"GET ftp://" + e + b"/x HTTP/1.1\r\nHost: x\r\n", None),
        (b"GET /x?api=http://" + e + b"/ HTTP/1.1\r\nHost: x\r\n", None),
        (b"GET /x?api=" + e + b" HTTP/1.1\r\nHost: x\r\n", None),
        (b"GET /x?api=127.0.0.1 HTTP/1.1\r\nHost: x\r\n", None),
        (b"GET http://" + e + b"/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n", b"/x"),
    ]


@pytest_twisted.ensureDeferred
async def test_no_target_header_or_parameter_reaches_an_unregistered_address(reactor, capture_node, proxy_factory):
    good = capture_node(name="good")
    evil = capture_node(name="evil")
    evil_hostport = evil.url.split("//")[1].encode()
    good_hostport = good.url.split("//")[1].encode()
    proxy = await proxy_factory([good.url])
    for raw, expected_target in attempts(evil_hostport):
        before = good.node.stats.requests
        response = await exchange(reactor, proxy, raw + b"Connection: close\r\n\r\n")
        if expected_target is None:
            assert status_of(response) in (400, 404), (raw, response)
            assert json_body(response)["code"] in ("bad_request_target", "node_not_found", "bad_node_choice")
            assert good.node.stats.requests == before, raw
        else:
            assert good.node.stats.requests == before + 1, (raw, response)
            record = good.node.stats.last_request
            assert record.uri == expected_target, raw
            headers = dict((name.lower(), value) for name, value in record.headers)
            assert headers[b"host"] == good_hostport
            # The client's own Host, as information only; a forged X-Forwarded-Host is replaced.
            assert headers[b"x-forwarded-host"] == raw.split(b"\r\nHost: ", 1)[1].split(b"\r\n", 1)[0]
            assert b"forwarded" not in headers and b"x-real-ip" not in headers
    assert evil.node.stats.connections_made == 0 and evil.received == []
    for stream in good.received:
        strict_requests(stream)


@pytest_twisted.ensureDeferred
async def test_api_parameter_picks_a_registered_node_by_id_or_name(reactor, capture_node, proxy_factory):
    first, second = capture_node(name="first"), capture_node(name="second")
    proxy = await proxy_factory([first.url, second.url], selection_policy="active-first")
    second_id = next(node.id for node in proxy.registry.nodes() if node.name == "node1")
    for choice in (b"node1", second_id.encode(), b"node%31"):
        response = await exchange(
            reactor, proxy, b"GET /api/probe?x=1&api=" + choice + b"&y=2 HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n")
        assert b"X-Blyan-Node: node1" in response
        assert second.node.stats.last_request.uri == b"/probe?x=1&y=2"
    assert first.node.stats.requests == 0
    unknown = await exchange(reactor, proxy, b"GET /x?api=nobody HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(unknown) == 404 and json_body(unknown)["code"] == "node_not_found"
    # The chosen node down: no failover to another node, a 503.
    await second.stop()
    down = await exchange(reactor, proxy, b"GET /x?api=node1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(down) in (502, 503) and first.node.stats.requests == 0


@pytest.mark.parametrize("health_path", ["@{evil}/health", "//{evil}/health", ":1@{evil}/health",
                                         "/health HTTP/1.1\r\nHost: {evil}\r\n\r\nGET /x"])
@pytest_twisted.ensureDeferred
async def test_a_health_path_in_metadata_never_points_probes_elsewhere(
        reactor, capture_node, proxy_factory, tmp_path, health_path):
    good = capture_node(name="good")
    evil = capture_node(name="evil")
    proxy = await proxy_factory([], persist=True, admin_token=TOKEN, state_file=str(tmp_path / "state.json"),
                                health_checks=True, health_interval=0.1)
    evil_hostport = evil.url.split("//")[1]
    response, body = await call(proxy, "POST", "/_admin/nodes", {
        "name": "gpu", "baseURL": good.url, "metadata": {"healthPath": health_path.format(evil=evil_hostport)}},
        headers=AUTH)
    assert response.code == 400 and body["code"] == "invalid_field" and "healthPath" in body["error"]
    await sleep(reactor, 0.3)
    assert evil.node.stats.connections_made == 0 and not proxy.registry.nodes()
