"""Metrics and the access log over real sockets: families present, values move, lines per ending, no secrets."""

import json
import re
import time

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import globalLogPublisher

from .rawhttp import connect, eventually
from .test_admin import TOKEN, call
from .test_drain import WEBSOCKET_UPGRADE
from .test_forwarding import chat_request, closed_port_url

FAMILIES = {
    "blyan_requests", "blyan_time_to_first_byte_seconds", "blyan_request_duration_seconds",
    "blyan_response_bytes", "blyan_failed_attempts", "blyan_open_streams", "blyan_health_probes",
    "blyan_health_probe_duration_seconds", "blyan_node_in_flight", "blyan_node_up", "blyan_node_usable",
    "blyan_node_ejected", "blyan_node_draining",
}


async def scrape(proxy, headers=None):
    response = await treq.get(proxy.url + "/metrics", headers=headers, timeout=5)
    text = (await response.content()).decode()
    return response.code, text, {f.name: f for f in text_string_to_metric_families(text)}


def sample(families, family, name, **labels):
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


@pytest_twisted.ensureDeferred
async def test_every_family_is_present_and_values_move_with_traffic(devnode_factory, proxy_factory):
    node = devnode_factory()
    proxy = await proxy_factory([closed_port_url(), node.url])
    code, _, before = await scrape(proxy)
    assert code == 200
    missing = FAMILIES - set(before)
    assert not missing, missing
    for _ in range(3):
        response = await treq.get(proxy.url + "/v1/models", timeout=5)
        await response.content()
    _, _, after = await scrape(proxy)
    assert sample(after, "blyan_requests", "blyan_requests_total", node="node1", status_class="2xx",
                  ended="complete") == 3
    assert sample(after, "blyan_failed_attempts", "blyan_failed_attempts_total", node="node0", reason="refused") == 1
    assert sample(after, "blyan_response_bytes", "blyan_response_bytes_total", node="node1") > 0
    assert sample(after, "blyan_time_to_first_byte_seconds", "blyan_time_to_first_byte_seconds_count",
                  node="node1") == 3
    assert sample(after, "blyan_node_usable", "blyan_node_usable", node="node0") == 0  # ejected
    assert sample(after, "blyan_node_ejected", "blyan_node_ejected", node="node0") == 1


@pytest_twisted.ensureDeferred
async def test_open_streams_gauge_follows_sse(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=20.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=6))
    await client.wait_for(b"chat.completion.chunk")
    _, _, during = await scrape(proxy)
    assert sample(during, "blyan_open_streams", "blyan_open_streams", kind="sse") == 1
    await client.wait_for(b"[DONE]")
    await eventually(reactor, lambda: proxy.registry.stats(proxy.registry.nodes()[0].id).in_flight == 0)
    _, _, done = await scrape(proxy)
    assert sample(done, "blyan_open_streams", "blyan_open_streams", kind="sse") == 0
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_access_log_lines_for_each_ending(reactor, devnode_factory, proxy_factory, access_lines):
    fast = devnode_factory(tokens_per_second=5.0, ttft_ms=0.0)
    proxy = await proxy_factory([closed_port_url(), fast.url])
    response = await treq.get(proxy.url + "/v1/models?api_key=SECRETVALUE&x=1", timeout=5)
    await response.content()
    completed = access_lines[-1]
    assert "GET /v1/models?api_key=…&x=… status=200 node=node1 attempts=2" in completed
    assert "ended=complete" in completed and "SECRETVALUE" not in completed

    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=50))
    await client.wait_for(b"chat.completion.chunk")
    client.transport.abortConnection()
    await eventually(reactor, lambda: "ended=client_gone" in access_lines[-1])
    assert "POST /v1/chat/completions status=200 node=node1" in access_lines[-1]

    hung = devnode_factory(hang=True)
    slow_proxy = await proxy_factory([hung.url], proxy_timeout=0.2)
    response = await treq.get(slow_proxy.url + "/v1/models", timeout=5)
    await response.content()
    assert "status=504 node=node0 attempts=1" in access_lines[-1] and "ended=timeout" in access_lines[-1]


@pytest_twisted.ensureDeferred
async def test_tokens_and_api_keys_appear_neither_in_the_log_nor_in_metrics(devnode_factory, proxy_factory):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        node = devnode_factory()
        proxy = await proxy_factory([node.url], admin_token="ADMINTOKEN-abcdefghijklmnop")
        for headers in ({"X-C3-API-KEY": "c3-KEY-0123456789"}, {"Authorization": "Bearer sk-APIKEY-987654"},
                        {"X-Admin-Token": "ADMINTOKEN-abcdefghijklmnop"}):
            for path in ("/v1/models", "/_admin/status", "/_admin/status?token=ADMINTOKEN-abcdefghijklmnop"):
                response = await treq.get(proxy.url + path, headers=headers, timeout=5)
                await response.content()
        _, text, _ = await scrape(proxy)
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = "\n".join(repr(e) for e in events)
    for secret in ("ADMINTOKEN-abcdefghijklmnop", "c3-KEY-0123456789", "sk-APIKEY-987654"):
        assert secret not in logged
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_metrics_token(proxy_factory):
    proxy = await proxy_factory([], metrics_token="scrape-token-0123456789")
    assert (await scrape_code(proxy, {})) == 401
    assert (await scrape_code(proxy, {"Authorization": "Bearer scrape-token-0123456789"})) == 200


async def scrape_code(proxy, headers):
    response = await treq.get(proxy.url + "/metrics", headers=headers, timeout=5)
    await response.content()
    return response.code


@pytest_twisted.ensureDeferred
async def test_requests_the_proxy_answers_itself_are_logged_too(proxy_factory, access_lines):
    proxy = await proxy_factory([])
    response = await treq.get(proxy.url + "/_admin/status", timeout=5)
    await response.content()
    assert "GET /_admin/status status=401 node=- attempts=0" in access_lines[-1]


@pytest_twisted.ensureDeferred
async def test_the_access_log_can_be_turned_off(proxy_factory, access_lines):
    proxy = await proxy_factory([], access_log=False)
    response = await treq.get(proxy.url + "/v1/models", timeout=5)
    await response.content()
    assert access_lines == []
    _, _, families = await scrape(proxy)
    assert sample(families, "blyan_requests", "blyan_requests_total", node="-", status_class="5xx") == 1


def masked_text_frame(text: bytes, mask: bytes = b"\x0f\x1e\x2d\x3c") -> bytes:
    """A WebSocket text frame as a client sends it (masked), for a payload under 126 bytes."""
    return bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))


async def status_counters(proxy):
    response = await treq.get(proxy.url + "/_status", timeout=5)
    return json.loads(await response.content())["metrics"]


@pytest_twisted.ensureDeferred
async def test_a_websocket_writes_an_access_line_when_it_ends_and_is_counted(
        reactor, devnode_factory, proxy_factory, access_lines):
    node = devnode_factory()
    proxy = await proxy_factory([node.url])
    client = await connect(reactor, proxy.url)
    client.transport.write(WEBSOCKET_UPGRADE)
    await client.wait_for(b"\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.1 101")
    frame = masked_text_frame(b"hello")
    client.transport.write(frame)
    await client.wait_for(b"\x81\x05hello")  # the echo, unmasked: 7 bytes
    assert not any(" /ws/echo " in line for line in access_lines)  # an open WebSocket has no line yet
    client.transport.loseConnection()
    await eventually(reactor, lambda: any(" /ws/echo " in line for line in access_lines))
    line = next(line for line in access_lines if " /ws/echo " in line)
    assert line.startswith("127.0.0.1 GET /ws/echo status=101 node=node0 attempts=1 ttfb_ms=")
    assert re.search(r" duration_ms=\d+\.\d ", line)
    assert f" bytes_in={len(frame)} bytes_out=7 ended=client_closed request_id=" in line
    assert await status_counters(proxy) == {"requests": 1, "failures": 0}  # /_status itself is not counted

    second = await connect(reactor, proxy.url)
    second.transport.write(WEBSOCKET_UPGRADE)
    await second.wait_for(b"\r\n\r\n")
    await node.stop()  # the node goes away mid-WebSocket
    await second.wait_closed()
    await eventually(reactor, lambda: "bytes_in=0 bytes_out=0 ended=node_closed request_id=" in access_lines[-1])
    assert await status_counters(proxy) == {"requests": 2, "failures": 0}
    _, _, families = await scrape(proxy)
    for ended in ("client_closed", "node_closed"):
        assert sample(families, "blyan_requests", "blyan_requests_total", node="node0", status_class="1xx",
                      ended=ended) == 1


@pytest_twisted.ensureDeferred
async def test_the_proxys_own_errors_log_the_bytes_they_send(reactor, proxy_factory, workloads_api, access_lines):
    proxy = await proxy_factory([closed_port_url()], max_attempts=1)
    for status in (502, 503):  # refused, then the node is ejected: no usable node
        response = await treq.get(proxy.url + "/v1/models", timeout=5)
        body = await response.content()
        assert response.code == status
        assert f"status={status} " in access_lines[-1] and f" bytes_out={len(body)} ended=error " in access_lines[-1]
    client = await connect(reactor, proxy.url)  # a WebSocket handshake no node can take
    client.transport.write(WEBSOCKET_UPGRADE)
    answer = await client.wait_for(b"}")
    head, _, body = answer.partition(b"\r\n\r\n")
    client.transport.loseConnection()
    assert head.startswith(b"HTTP/1.1 503 ") and f"content-length: {len(body)}".encode() in head.lower()
    await eventually(reactor, lambda: " /ws/echo status=503 " in access_lines[-1])
    assert f" bytes_out={len(body)} ended=error " in access_lines[-1]
    discovering = await proxy_factory([], api_url=workloads_api.url)
    response = await treq.get(discovering.url + "/v1/models", timeout=5)  # no API key: refused before any node
    body = await response.content()
    assert response.code == 401 and f" bytes_out={len(body)} ended=error " in access_lines[-1]


@pytest_twisted.ensureDeferred
async def test_status_and_metrics_agree_on_an_ejection(reactor, devnode_factory, proxy_factory):
    """A node whose probes passed but whose traffic fails is ejected in /_admin/status as in /metrics."""
    node = devnode_factory()
    proxy = await proxy_factory([node.url], health_checks=True, health_interval=600.0, admin_token=TOKEN)
    node_id = proxy.registry.nodes()[0].id
    await eventually(reactor, lambda: proxy.registry.stats(node_id).health.state == "up")
    status = (await call(proxy, "GET", "/_admin/status"))[1]["nodes"][0]
    assert (status["state"], status["healthy"], status["ejected"]) == ("up", True, False)
    assert abs(status["lastCheck"] - time.time() * 1000) < 60_000  # epoch milliseconds
    await node.stop()
    assert (await treq.get(proxy.url + "/_devnode/echo", timeout=5)).code == 502  # refused: ejected at once
    status = (await call(proxy, "GET", "/_admin/status"))[1]["nodes"][0]
    assert (status["state"], status["healthy"], status["ejected"], status["usable"]) == ("ejected", False, True, False)
    assert status["ejectReason"] == "refused" and status["ejectedUntil"] > time.time() * 1000
    _, _, families = await scrape(proxy)
    assert sample(families, "blyan_node_ejected", "blyan_node_ejected", node="node0") == 1
    assert sample(families, "blyan_node_usable", "blyan_node_usable", node="node0") == 0
    assert sample(families, "blyan_node_up", "blyan_node_up", node="node0") == 1  # its health checks passed
