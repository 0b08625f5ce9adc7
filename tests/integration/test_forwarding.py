"""Forwarding over real sockets: a proxy in front of simulated GPU nodes."""

import json
import socket

import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from .rawhttp import connect, eventually, sleep


def closed_port_url():
    """The URL of a loopback port nobody listens on (connections are refused)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


def chat_request(max_tokens: int, stream: bool = True) -> bytes:
    """A raw HTTP/1.1 chat completion request."""
    body = json.dumps({"model": "blyan-sim-7b", "messages": [{"role": "user", "content": "hi"}],
                       "stream": stream, "max_tokens": max_tokens}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def sse_events(body: bytes):
    """The ``data:`` payloads of an SSE body, in order."""
    return [
        line[len(b"data: "):]
        for event in body.split(b"\n\n")
        for line in event.split(b"\n")
        if line.startswith(b"data: ")
    ]


@pytest_twisted.ensureDeferred
async def test_sse_events_arrive_one_by_one_while_the_node_generates(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=20.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    started = reactor.seconds()
    client.transport.write(chat_request(max_tokens=10))
    received = await client.wait_for(b"data: [DONE]", timeout=10)
    head, _, _ = received.partition(b"\r\n\r\n")
    assert b"HTTP/1.1 200" in head
    assert b"Transfer-Encoding: chunked" in head
    assert b"X-Blyan-Node: node0" in head
    event_times = [t for t, data in client.arrivals if b"chat.completion.chunk" in data]
    # Ten tokens at 20/s take about half a second; the events trickle in over that time.
    assert len(event_times) >= 5
    assert event_times[0] - started < (event_times[-1] - started) / 2
    chunks = [json.loads(e) for e in sse_events(received) if e != b"[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_openai_client_streams_and_completes_through_the_proxy(devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=500.0, ttft_ms=5.0, max_tokens=12)
    proxy = await proxy_factory([node.url])

    def use_openai():
        from openai import OpenAI

        client = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
        streamed = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="blyan-sim-7b", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if chunk.choices
        ]
        whole = client.chat.completions.create(
            model="blyan-sim-7b", messages=[{"role": "user", "content": "hi"}]
        )
        return streamed, whole

    streamed, whole = await deferToThread(use_openai)
    assert len([piece for piece in streamed if piece]) == 12
    assert whole.choices[0].message.content
    assert whole.usage.completion_tokens == 12


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_node(reactor, devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    size = 200 * 1024 * 1024
    client.transport.write(b"GET /_devnode/bytes?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
    await client.wait_for(b"\r\n\r\n")
    client.transport.pauseProducing()
    await sleep(reactor, 1.0)
    first = node.node.stats.bytes_sent
    await sleep(reactor, 0.5)
    # The node is stalled: what it could write fits in socket buffers, not in proxy memory.
    assert node.node.stats.bytes_sent == first
    assert first < 32 * 1024 * 1024
    client.transport.resumeProducing()
    await eventually(reactor, lambda: node.node.stats.bytes_sent > first + 1024 * 1024)
    client.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_mid_stream_closes_the_node_connection(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=10.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=1000))
    await client.wait_for(b"chat.completion.chunk")
    assert node.node.stats.open_streams == 1
    client.transport.abortConnection()
    await eventually(reactor, lambda: node.node.stats.streams_aborted == 1, timeout=2)
    await eventually(reactor, lambda: sum(proxy.registry.stats(n.id).in_flight for n in proxy.registry.nodes()) == 0)


async def get_json(url, **kwargs):
    response = await treq.request(kwargs.pop("method", "GET"), url, timeout=10, **kwargs)
    return response, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_a_refused_node_fails_over(devnode_factory, proxy_factory):
    healthy = devnode_factory(name="healthy")
    proxy = await proxy_factory([closed_port_url(), healthy.url])
    response, body = await get_json(proxy.url + "/v1/models")
    assert response.code == 200
    assert body["object"] == "list"
    assert response.headers.getRawHeaders("X-Blyan-Node") == ["node1"]
    assert response.headers.getRawHeaders("X-Blyan-Attempts") == ["2"]
    dead = proxy.registry.nodes()[0]
    assert proxy.registry.stats(dead.id).last_failure == "refused"


@pytest_twisted.ensureDeferred
async def test_a_hung_node_fails_over_after_the_header_timeout(devnode_factory, proxy_factory):
    hung = devnode_factory(hang=True)
    healthy = devnode_factory()
    proxy = await proxy_factory([hung.url, healthy.url], proxy_timeout=0.3)
    response, _ = await get_json(proxy.url + "/v1/models")
    assert response.code == 200
    assert response.headers.getRawHeaders("X-Blyan-Attempts") == ["2"]
    assert proxy.registry.stats(proxy.registry.nodes()[0].id).last_failure == "response_timeout"


@pytest_twisted.ensureDeferred
async def test_a_node_answering_503_fails_over(devnode_factory, proxy_factory):
    busy = devnode_factory(fail_status=503)
    healthy = devnode_factory()
    proxy = await proxy_factory([busy.url, healthy.url])
    response, body = await get_json(proxy.url + "/v1/models")
    assert response.code == 200
    assert response.headers.getRawHeaders("X-Blyan-Node") == ["node1"]


@pytest_twisted.ensureDeferred
async def test_the_last_node_standing_answers_as_it_is(devnode_factory, proxy_factory):
    busy = devnode_factory(fail_status=503)
    proxy = await proxy_factory([busy.url])
    response, _ = await get_json(proxy.url + "/v1/models")
    assert response.code == 503
    assert response.headers.getRawHeaders("X-Blyan-Attempts") == ["1"]


@pytest_twisted.ensureDeferred
async def test_no_node_at_all_is_503_with_retry_after(proxy_factory):
    proxy = await proxy_factory([])
    response, body = await get_json(proxy.url + "/v1/models")
    assert response.code == 503
    assert body["error"]["code"] == "no_healthy_nodes"  # /v1: OpenAI's shape
    assert response.headers.getRawHeaders("Retry-After") == ["5"]
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert response.headers.getRawHeaders("Server") is None


@pytest_twisted.ensureDeferred
async def test_every_node_dead_is_a_502_json(proxy_factory):
    proxy = await proxy_factory([closed_port_url(), closed_port_url()])
    response, body = await get_json(proxy.url + "/v1/models")
    assert response.code == 502
    [request_id] = response.headers.getRawHeaders("X-Request-Id")
    assert body == {"error": {"message": "the node refused the connection", "type": "server_error", "param": None,
                              "code": "upstream_unreachable"}, "request_id": request_id}
    assert response.headers.getRawHeaders("X-Blyan-Attempts") is None


@pytest_twisted.ensureDeferred
async def test_only_a_hung_node_is_504(devnode_factory, proxy_factory):
    hung = devnode_factory(hang=True)
    proxy = await proxy_factory([hung.url], proxy_timeout=0.2)
    response, body = await get_json(proxy.url + "/v1/models")
    assert response.code == 504
    assert body["error"]["code"] == "upstream_timeout"


@pytest_twisted.ensureDeferred
async def test_max_attempts_bounds_failover(proxy_factory):
    proxy = await proxy_factory([closed_port_url() for _ in range(4)], max_attempts=2)
    response, _ = await get_json(proxy.url + "/v1/models")
    assert response.code == 502
    tried = [n for n in proxy.registry.nodes() if proxy.registry.stats(n.id).failures]
    assert len(tried) == 2


@pytest_twisted.ensureDeferred
async def test_request_headers_path_and_body_reach_the_node_intact(reactor, devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(
        b"POST /api/_devnode/echo/a%2Fb?q=%20x&q=2 HTTP/1.1\r\n"
        b"Host: proxy.example\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Multi: one\r\n"
        b"X-Multi: two\r\n"
        b"X-Devnode-Set-Header: Set-Cookie: a=1\r\n"
        b"X-Devnode-Set-Header: Set-Cookie: b=2\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    received = await client.wait_for(b"}")
    head, _, body = received.partition(b"\r\n\r\n")
    echo = json.loads(body[body.index(b"{"):])
    assert echo["uri"] == "/_devnode/echo/a%2Fb?q=%20x&q=2"
    assert echo["method"] == "POST"
    assert echo["body"] == "hello"
    seen = {}
    for name, value in echo["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    assert seen["host"] == [node.url.split("//")[1]]
    assert seen["x-multi"] == ["one", "two"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["proxy.example"]
    assert seen["content-length"] == ["5"]
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization", "connection"):
        assert hop not in seen
    assert head.count(b"Set-Cookie: ") == 2
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_declared_oversized_body_is_413_before_it_is_sent(reactor, devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url], max_body_bytes=1000)
    client = await connect(reactor, proxy.url)
    client.transport.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
    )
    received = await client.wait_closed()
    assert received.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in received
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"
    assert node.node.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_413(reactor, devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url], max_body_bytes=1000)
    client = await connect(reactor, proxy.url)
    client.transport.write(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        client.transport.write(b"200\r\n" + b"x" * 512 + b"\r\n")
    received = await client.wait_closed()
    assert received.startswith(b"HTTP/1.1 413 ")
    assert node.node.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_body_under_the_limit_is_replayed_on_failover(devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([closed_port_url(), node.url], max_body_bytes=200_000)
    payload = b"z" * 150_000
    response, echo = await get_json(proxy.url + "/_devnode/echo", method="POST", data=payload)
    assert response.code == 200
    assert echo["body_length"] == len(payload)


@pytest_twisted.ensureDeferred
async def test_idle_stream_is_cut_with_an_sse_error_event(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=1.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url], idle_timeout=0.3)
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=50))
    received = await client.wait_closed()
    assert b"event: error" in received
    assert b'"code": "idle_timeout"' in received
    assert not received.endswith(b"0\r\n\r\n")
    await eventually(reactor, lambda: node.node.stats.streams_aborted == 1)


@pytest_twisted.ensureDeferred
async def test_node_dying_mid_stream_ends_the_client_response_as_failed(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=200.0, ttft_ms=0.0, close_after=3)
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=50))
    received = await client.wait_closed()
    assert b"event: error" in received
    assert b"upstream_broke" in received
    assert b"[DONE]" not in received


@pytest_twisted.ensureDeferred
async def test_head_request(devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url])
    response = await treq.head(proxy.url + "/_devnode/echo", timeout=5)
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert await response.content() == b""
    assert node.node.stats.by_path == {"/_devnode/echo": 1}


@pytest_twisted.ensureDeferred
async def test_websocket_echo_through_the_proxy(devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url])

    def talk():
        from websockets.sync.client import connect as ws_connect

        with ws_connect(proxy.url.replace("http", "ws") + "/api/ws/echo", open_timeout=5, close_timeout=2) as ws:
            ws.send("hello")
            text = ws.recv(timeout=5)
            ws.send(b"\x00\x01binary")
            data = ws.recv(timeout=5)
            big = "x" * 300_000
            ws.send(big)
            echoed_big = ws.recv(timeout=5)
            return text, data, echoed_big == big, ws.response.headers.get("X-Blyan-Node")

    text, data, big_ok, node_name = await deferToThread(talk)
    assert (text, data, big_ok, node_name) == ("hello", b"\x00\x01binary", True, "node0")


@pytest_twisted.ensureDeferred
async def test_websockets_that_ended_give_their_client_address_its_connections_back(reactor, devnode_factory,
                                                                                   proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url], max_connections_per_client=2)

    def one_websocket():
        from websockets.sync.client import connect as ws_connect

        with ws_connect(proxy.url.replace("http", "ws") + "/api/ws/echo", open_timeout=5, close_timeout=2) as ws:
            ws.send("hi")
            return ws.recv(timeout=5)

    for _ in range(4):  # twice the cap, one after the other: each gives its slot back when it closes
        assert await deferToThread(one_websocket) == "hi"
        await eventually(reactor, lambda: proxy.site.connections.open_from("127.0.0.1") == 0)
    response = await treq.get(proxy.url + "/_devnode/stats", timeout=5)
    assert response.code == 200
    await response.content()


@pytest_twisted.ensureDeferred
async def test_websocket_to_a_node_that_refuses_the_upgrade(devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url])

    def talk():
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect as ws_connect

        try:
            ws_connect(proxy.url.replace("http", "ws") + "/v1/models", open_timeout=5)
        except InvalidStatus as exc:
            return exc.response.status_code, exc.response.body
        return None, None

    status, body = await deferToThread(talk)
    assert status == 200
    assert json.loads(body)["object"] == "list"


@pytest_twisted.ensureDeferred
async def test_websocket_fails_over_from_a_dead_node(devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([closed_port_url(), node.url])

    def talk():
        from websockets.sync.client import connect as ws_connect

        with ws_connect(proxy.url.replace("http", "ws") + "/ws/echo", open_timeout=5) as ws:
            ws.send("again")
            return ws.recv(timeout=5)

    assert await deferToThread(talk) == "again"


@pytest_twisted.ensureDeferred
async def test_websocket_handshake_timeout_fails_over(devnode_factory, proxy_factory):
    hung = devnode_factory(hang=True)
    node = devnode_factory()
    proxy = await proxy_factory([hung.url, node.url], proxy_timeout=0.3)

    def talk():
        from websockets.sync.client import connect as ws_connect

        with ws_connect(proxy.url.replace("http", "ws") + "/ws/echo", open_timeout=5) as ws:
            ws.send("once more")
            return ws.recv(timeout=5), ws.response.headers.get("X-Blyan-Node")

    assert await deferToThread(talk) == ("once more", "node1")
    hung_node = proxy.registry.nodes()[0]
    assert proxy.registry.stats(hung_node.id).last_failure == "response_timeout"


@pytest_twisted.ensureDeferred
async def test_open_websockets_count_in_flight_until_closed(reactor, devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url])
    stats = proxy.registry.stats(proxy.registry.nodes()[0].id)

    def talk():
        from twisted.internet.threads import blockingCallFromThread
        from websockets.sync.client import connect as ws_connect

        with ws_connect(proxy.url.replace("http", "ws") + "/ws/echo", open_timeout=5) as ws:
            ws.send("ping")
            assert ws.recv(timeout=5) == "ping"
            return blockingCallFromThread(reactor, lambda: stats.in_flight)

    assert await deferToThread(talk) == 1
    await eventually(reactor, lambda: stats.in_flight == 0)


@pytest_twisted.ensureDeferred
async def test_websocket_refused_with_an_empty_body_is_answered_at_once(reactor, proxy_factory):
    from twisted.internet.protocol import Factory, Protocol

    class Refuser(Protocol):
        def dataReceived(self, data):
            if b"\r\n\r\n" in data:
                self.transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")

    port = reactor.listenTCP(0, Factory.forProtocol(Refuser), interface="127.0.0.1")
    try:
        proxy = await proxy_factory([f"http://127.0.0.1:{port.getHost().port}"])

        def talk():
            from websockets.exceptions import InvalidStatus
            from websockets.sync.client import connect as ws_connect

            try:
                ws_connect(proxy.url.replace("http", "ws") + "/ws", open_timeout=3, proxy=None)
            except InvalidStatus as exc:
                return exc.response.status_code
            return None

        assert await deferToThread(talk) == 401
        stats = proxy.registry.stats(proxy.registry.nodes()[0].id)
        await eventually(reactor, lambda: stats.in_flight == 0)
    finally:
        await port.stopListening()
