"""Hostile HTTP against the proxy, checked at the node: smuggling shapes, oversized and slow heads.

Each shape must end either in a 400-class answer to the client with nothing at
the node, or in exactly one clean request at the node (``strict_requests``);
never a second, smuggled request. After each, another client is still served.
"""

import json
import re

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from .capture import strict_requests
from .rawhttp import connect, error_code, sleep

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

SHAPES = {
    "cl-and-te": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n" + SMUGGLED,
    "te-and-cl": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
                 b"0\r\n\r\n" + SMUGGLED,
    "two-content-lengths": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 42\r\n\r\n"
                           b"abcde" + SMUGGLED,
    "content-length-list": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 42\r\n\r\nabcde" + SMUGGLED,
    "content-length-plus": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nabcde" + SMUGGLED,
    "content-length-negative": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + SMUGGLED,
    "content-length-hex": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nabcde" + SMUGGLED,
    "chunk-size-hex-prefix": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"0x5\r\nabcde\r\n0\r\n\r\n" + SMUGGLED,
    "chunk-size-negative": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"-5\r\nabcde\r\n0\r\n\r\n" + SMUGGLED,
    "chunk-size-plus": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"+5\r\nabcde\r\n0\r\n\r\n" + SMUGGLED,
    "chunk-size-space": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b" 5\r\nabcde\r\n0\r\n\r\n" + SMUGGLED,
    "chunk-size-huge": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"fffffffffffffffffffffff\r\nabcde\r\n0\r\n\r\n" + SMUGGLED,
    "chunk-data-overrun": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nabcde\r\n0\r\n\r\n" + SMUGGLED,
    "te-not-chunked": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabcde" + SMUGGLED,
    "te-chunked-then-identity": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                                b"0\r\n\r\n" + SMUGGLED,
    "te-twice": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                b"0\r\n\r\n" + SMUGGLED,
    "te-space-before-colon": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n"
                             b"0\r\n\r\n" + SMUGGLED,
    "te-obs-fold": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
                   b"0\r\n\r\n" + SMUGGLED,
    "header-obs-fold": b"GET /in HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n two\r\n\r\n",
    "bare-lf-head": b"GET /in HTTP/1.1\nHost: x\nX-A: 1\n\n",
    "bare-lf-in-te": b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 5\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\n" + SMUGGLED,
    "bare-cr-in-value": b"GET /in HTTP/1.1\r\nHost: x\r\nX-A: 1\rX-Injected: 1\r\n\r\n",
    "nul-in-value": b"GET /in HTTP/1.1\r\nHost: x\r\nX-A: 1\x00X-Injected: 1\r\n\r\n",
    "two-hosts": b"GET /in HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "space-in-target": b"GET /in HTTP/1.1 HTTP/1.1\r\nHost: x\r\n\r\n",
    "http10-chunked": b"POST /in HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "header-too-large": b"GET /in HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "too-many-headers": b"GET /in HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 600 + b"\r\n",
    "te-identity-no-body": b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    "te-identity-then-request": b"GET /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n" + SMUGGLED,
}

#: Shapes that are well-formed so far: the proxy waits for the rest of the body, sending nothing on
#: (a client that then stays silent is closed by the 60 s idle timeout of the connection).
AWAITS_BODY = {"chunk-size-huge"}


async def send(reactor, proxy, raw: bytes, timeout: float = 10) -> bytes:
    """Send ``raw``, then read until the proxy closes or a quiet second passes."""
    client = await connect(reactor, proxy.url)
    client.transport.write(raw)
    waited = 0.0
    while not client.closed.called and waited < timeout:
        seen = len(client.received)
        await sleep(reactor, 0.1)
        waited += 0.1
        if client.received and len(client.received) == seen:
            break
    client.transport.abortConnection()
    return client.received


@pytest.fixture
def logged_failures():
    """Every log event carrying a traceback (a ``log_failure``) during the test."""
    failures = []

    def observe(event):
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)


async def all_timed_out(clients) -> None:
    """Every one of ``clients`` got the JSON 408 ``request_timeout``, then the connection closed."""
    for client in clients:
        received = await client.wait_closed(timeout=5)
        assert statuses(received) == [408]
        assert error_code(json.loads(received.partition(b"\r\n\r\n")[2])) == "request_timeout"


def statuses(received: bytes):
    """The statuses of the responses in ``received`` (bodies here never hold a status line)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest_twisted.ensureDeferred
async def test_smuggling_shapes_reach_the_node_as_one_clean_request_or_not_at_all(
        reactor, capture_node, proxy_factory, logged_failures, name):
    node = capture_node()
    proxy = await proxy_factory([node.url], header_timeout=0.5)
    received = await send(reactor, proxy, SHAPES[name], timeout=1.5)
    at_node = [request for stream in node.received for request in strict_requests(stream)]
    answered = statuses(received)
    if name in AWAITS_BODY:
        assert received == b"" and at_node == []
        answered = [0]
    assert answered, f"{name}: no answer at all: {received!r}"
    assert not any(line.startswith(b"GET /smuggled") for line, _, _ in at_node), name
    if name in AWAITS_BODY:
        pass
    elif answered[0] >= 400 and not at_node:
        assert answered[0] in (400, 408, 413), received
        body = received.partition(b"\r\n\r\n")[2]
        assert json.loads(body)["code"], received
    else:
        assert len(at_node) == 1, (name, at_node)
        assert answered[0] < 500, received
    # The proxy keeps serving.
    other = await send(reactor, proxy, b"GET /_devnode/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(other) == [200]
    assert logged_failures == [], name  # a refusal, never a traceback


@pytest_twisted.ensureDeferred
async def test_slow_header_clients_get_408_and_others_are_served_meanwhile(reactor, capture_node, proxy_factory):
    node = capture_node()
    proxy = await proxy_factory([node.url], header_timeout=0.6)
    head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"
    slow = [await connect(reactor, proxy.url) for _ in range(20)]
    for position in range(len(head) - 1):  # one byte each 50 ms: never idle, never done
        if position % 4 == 0:
            other = await send(reactor, proxy, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert statuses(other) == [404]  # the node's own answer: /ok is not one of its routes
        for client in slow:
            client.transport.write(head[position:position + 1])
        await sleep(reactor, 0.05)
        if all(client.closed.called for client in slow):
            break
    await all_timed_out(slow)
    assert not any(line.startswith(b"GET /slow") for stream in node.received for line, _, _ in strict_requests(stream))


@pytest_twisted.ensureDeferred
async def test_keep_alive_requests_each_get_the_full_head_deadline(reactor, capture_node, proxy_factory):
    """The deadline restarts after each request: a pipelined or later request is not cut short."""
    node = capture_node()
    proxy = await proxy_factory([node.url], header_timeout=0.5)
    client = await connect(reactor, proxy.url)
    for _ in range(3):
        client.transport.write(b"GET /_devnode/stats HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        await sleep(reactor, 0.3)
    await sleep(reactor, 0.1)
    assert statuses(client.received) == [200] * 6
    received = await client.wait_closed(timeout=5)  # then idle past the deadline: closed with a 408
    assert statuses(received) == [200] * 6 + [408]


HOSTILE_FIELDS = [
    {"name": "a\r\nX-Injected: 1"},
    {"name": "a\nX-Injected: 1"},
    {"name": "a\u2028X-Injected: 1"},
    {"name": "a\x85X-Injected: 1"},
    {"name": "a\x00b"},
    {"tags": ["a\r\nX-Injected: 1"]},
    {"tags": ["ok", "a b"]},
    {"metadata": {"healthPath": "/health\r\nX-Injected: 1"}},
    {"metadata": {"note": "a\r\nX-Injected: 1", "nested": {"k": "\x1b[31m"}}},
]


@pytest.mark.parametrize("fields", HOSTILE_FIELDS)
@pytest_twisted.ensureDeferred
async def test_admin_fields_never_inject_into_requests_or_logs(reactor, capture_node, proxy_factory, tmp_path, fields):
    from twisted.logger import formatEvent, globalLogPublisher

    from .test_admin import AUTH, TOKEN, call

    node = capture_node()
    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        proxy = await proxy_factory([], persist=True, admin_token=TOKEN, state_file=str(tmp_path / "state.json"),
                                    health_checks=True, health_interval=0.1)
        response, body = await call(proxy, "POST", "/_admin/nodes", {"name": "n", "baseURL": node.url, **fields},
                                    headers=AUTH)
        if response.code == 200:
            node_id = body["node"]["id"]
            await call(proxy, "PATCH", f"/_admin/nodes/{node_id}", {"weight": 2}, headers=AUTH)
            served = await send(reactor, proxy, b"GET /_devnode/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert statuses(served) == [200]
            await sleep(reactor, 0.3)  # a few health probes
        else:
            assert response.code == 400 and body["code"] == "invalid_field"
    finally:
        globalLogPublisher.removeObserver(observer)
    for stream in node.received:
        for _, headers, _ in strict_requests(stream):
            assert not any(name == b"x-injected" for name, _ in headers)
    assert not any("X-Injected" in line.splitlines()[-1] and len(line.splitlines()) > 1 for line in lines)
    assert not any("\x1b" in line for line in lines)


@pytest.mark.parametrize("value", [b"%E2%80%A8", b"%FF", b"%00", b"%1B%5B31m", b"caf%C3%A9"])
@pytest_twisted.ensureDeferred
async def test_any_affinity_value_is_forwarded_never_a_500(reactor, capture_node, proxy_factory, logged_failures,
                                                           value):
    from blyanproxy.core import parse_affinity_source

    node = capture_node()
    proxy = await proxy_factory([node.url], affinity_key=parse_affinity_source("query:t"))
    received = await send(reactor, proxy, b"GET /_devnode/stats?t=" + value + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
    assert statuses(received) == [200]
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_query_names_reach_the_access_log_escaped_and_bare_values_redacted(
        reactor, capture_node, proxy_factory, access_lines):
    node = capture_node()
    proxy = await proxy_factory([node.url])
    query = b"%1B%5B31m=1&a%0D%0AX-Forged%3A+1=2&%E2%80%A8=3&sk-live-SECRET123"
    received = await send(reactor, proxy, b"GET /_devnode/stats?" + query + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
    assert statuses(received) == [200]
    [line] = access_lines
    assert not any(char in line for char in "\x1b\r\n\u2028")
    assert "SECRET" not in line
    assert "/_devnode/stats?\\x1b[31m=…&a\\x0d\\x0aX-Forged:\\x201=…&\\u2028=…&… status=200" in line


@pytest_twisted.ensureDeferred
async def test_the_admin_token_and_underscore_headers_never_reach_the_node(reactor, capture_node, proxy_factory):
    node = capture_node()
    proxy = await proxy_factory([node.url])
    received = await send(reactor, proxy, b"GET /_devnode/stats HTTP/1.1\r\nHost: x\r\nX-Admin-Token: " + b"t" * 32
                          + b"\r\nX_forwarded_for: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nConnection: close\r\n\r\n")
    assert statuses(received) == [200]
    [(_, headers, _)] = [request for stream in node.received for request in strict_requests(stream)]
    names = [name for name, _ in headers]
    assert b"x-admin-token" not in names and not [name for name in names if b"_" in name]
    assert dict(headers)[b"x-forwarded-for"] == b"127.0.0.1"


@pytest.mark.parametrize("line", [b"X-A: a\x0bb", b"X-A: a\x0cb", b"X-A: \x1b[31mred", b"X-A: a\x7f", b"X-A: \x01",
                                  b"X\x0bA: 1", b"X\x1bA: 1", b"X\x7fA: 1", b"X\x01A: 1"])
@pytest_twisted.ensureDeferred
async def test_a_control_character_in_a_header_is_refused_before_the_node(reactor, capture_node, proxy_factory,
                                                                          logged_failures, line):
    node = capture_node()
    proxy = await proxy_factory([node.url])
    received = await send(reactor, proxy, b"GET /_devnode/stats HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n")
    assert statuses(received) == [400]
    assert error_code(json.loads(received.partition(b"\r\n\r\n")[2])) == "malformed_request"
    assert node.received in ([], [b""])
    assert logged_failures == []


ADMIN_SPELLINGS = [
    b"/api/%5Fadmin/nodes", b"/0/%5Fadmin/nodes", b"/tags/all/%5fadmin/x", b"/api/_ADMIN/nodes",
    b"http://x/%5Fadmin/status", b"/_admin;/status", b"/_admin%20/status", b"/_admin\\status",
    b"/_admin/..%2Fstatus", b"/_ADMIN/status", b"/api/%255Fadmin/nodes", b"//_admin/status",
]


@pytest.mark.parametrize("target", ADMIN_SPELLINGS)
@pytest_twisted.ensureDeferred
async def test_admin_spellings_reach_neither_the_node_nor_the_admin_app(reactor, capture_node, proxy_factory, target):
    node = capture_node()
    proxy = await proxy_factory([node.url], admin_token="t" * 32)
    received = await send(reactor, proxy, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nX-Admin-Token: " + b"t" * 32
                          + b"\r\nConnection: close\r\n\r\n")
    assert statuses(received) in ([400], [404]), received
    assert error_code(json.loads(received.partition(b"\r\n\r\n")[2])) in ("not_found", "bad_request_target")
    assert node.received == []


@pytest.mark.parametrize("client_version", [b"HTTP/1.1", b"HTTP/1.0"])
@pytest_twisted.ensureDeferred
async def test_chunk_extensions_and_trailers_from_a_node_never_reach_the_client(reactor, raw_node, proxy_factory,
                                                                                client_version):
    node = raw_node(lambda head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b'5;ext="a\rb"\r\nhello\r\n6 ;\x1b[31m\r\n world\r\n0;x\r\nX-Bad: \x01\r\n'
                                 b"Set-Cookie: t=1\r\n\r\n")
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(b"GET /x " + client_version + b"\r\nHost: x\r\n\r\n")
    if client_version == b"HTTP/1.1":
        received = await client.wait_for(b"0\r\n\r\n")
    else:
        received = await client.wait_closed()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200"
    if client_version == b"HTTP/1.1":
        assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    else:
        assert body == b"hello world"
    client.transport.loseConnection()


SWITCH_TO_ANYTHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"


@pytest.mark.parametrize("upgrade", [b"", b"Upgrade: foo\r\nConnection: upgrade\r\n", b"Upgrade: h2c\r\n"])
@pytest_twisted.ensureDeferred
async def test_a_101_to_an_ordinary_request_opens_no_tunnel(reactor, raw_node, proxy_factory, upgrade):
    node = raw_node(lambda head: SWITCH_TO_ANYTHING)
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(b"GET /ws101 HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n")
    await client.wait_for(b"}")
    # The same client connection goes on: its next request is a request, never bytes in a tunnel.
    client.transport.write(b"GET /_admin/status HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
                           b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    received = await client.wait_closed()
    assert statuses(received) == [502, 401, 502]
    # Nothing of the node's 101 is relayed (the request ids are random hex: "101" may be in one).
    assert b"HTTP/1.1 101" not in received and b"Switching Protocols" not in received
    assert [stream.count(b"\r\n\r\n") for stream in node.received] == [1, 1]  # one request per connection
    assert all(not stream.startswith(b"GET /_admin") for stream in node.received)


@pytest_twisted.ensureDeferred
async def test_a_websocket_101_without_the_handshake_is_502(reactor, raw_node, proxy_factory):
    node = raw_node(lambda head: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"X-Blyan-Node: forged\r\n\r\n")
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    received = await client.wait_for(b"}")
    assert statuses(received) == [502] and b"forged" not in received
    client.transport.write(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await client.wait_closed()
    assert not any(b"GET /after" in stream.partition(b"\r\n\r\n")[2] for stream in node.received)


@pytest_twisted.ensureDeferred
async def test_slow_bodies_are_cut_at_the_body_deadline(reactor, capture_node, proxy_factory):
    # The probe of issue 20: bodies declared huge, a byte at a time, never idle.
    node = capture_node()
    proxy = await proxy_factory([node.url], header_timeout=0.5, body_timeout=0.6, max_buffered_bytes=2**40)
    slow = [await connect(reactor, proxy.url) for _ in range(10)]
    for client in slow:
        client.transport.write(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n\r\n")
    for _ in range(30):  # a byte each 50 ms from each: never idle, never done
        for client in slow:
            if not client.closed.called:
                client.transport.write(b"a")
        await sleep(reactor, 0.05)
        if all(client.closed.called for client in slow):
            break
    await all_timed_out(slow)
    assert node.received == []
    assert proxy.site.body_budget.held == 0  # what they declared is free again


@pytest_twisted.ensureDeferred
async def test_request_bodies_held_at_once_are_capped(reactor, capture_node, proxy_factory):
    node = capture_node()
    proxy = await proxy_factory([node.url], max_buffered_bytes=100_000)
    holder = await connect(reactor, proxy.url)
    holder.transport.write(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 80000\r\n\r\n" + b"a" * 1000)
    await sleep(reactor, 0.1)
    refused = await send(reactor, proxy, b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 80000\r\n\r\n")
    assert statuses(refused) == [503] and b"Retry-After: 1" in refused
    assert error_code(json.loads(refused.partition(b"\r\n\r\n")[2])) == "proxy_busy"
    small = await send(reactor, proxy, b"POST /_devnode/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                       b"Connection: close\r\n\r\nhello")
    assert statuses(small) == [200]  # what fits is still served
    holder.transport.abortConnection()  # the holder vanishes: its bytes are released
    await holder.wait_closed()
    await sleep(reactor, 0.1)
    body = b"b" * 80000
    served = await send(reactor, proxy, b"POST /_devnode/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 80000\r\n"
                        b"Connection: close\r\n\r\n" + body)
    assert statuses(served) == [200]
    assert proxy.site.body_budget.held == 0


@pytest_twisted.ensureDeferred
async def test_connections_per_client_address_are_capped(reactor, capture_node, proxy_factory):
    node = capture_node()
    proxy = await proxy_factory([node.url], max_connections_per_client=3)
    held = [await connect(reactor, proxy.url) for _ in range(3)]
    extra = await connect(reactor, proxy.url)
    received = await extra.wait_closed()
    assert statuses(received) == [429]
    assert error_code(json.loads(received.partition(b"\r\n\r\n")[2])) == "too_many_connections"
    held[0].transport.loseConnection()
    await held[0].wait_closed()
    await sleep(reactor, 0.1)
    served = await send(reactor, proxy, b"GET /_devnode/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(served) == [200]
    for client in held[1:]:
        client.transport.loseConnection()
