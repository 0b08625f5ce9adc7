"""The simulated GPU node over real sockets on 127.0.0.1, with independent clients (treq, the
``openai`` client, the ``websockets`` library, raw TCP, twistd in a subprocess)."""

from __future__ import annotations

import json
import os
import time

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.application.service import IServiceMaker
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH

from blyanproxy.devnode.wire import completion_text

from .conftest import devnode_timers
from .processes import TWIST, TWISTD, ProcessCapture, free_port
from .rawhttp import connect, eventually, sleep

WAIT = 5.0  # seconds any single exchange may take before a test fails
CHAT_PATH = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def http(reactor):
    """A treq client opening a connection per request, so nothing stays pooled between tests."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def within(reactor, deferred: Deferred, seconds: float = WAIT) -> Deferred:
    """``deferred``, failing with TimeoutError after ``seconds``."""
    return deferred.addTimeout(seconds, reactor)


async def get_json(reactor, http, url: str, **kwargs) -> tuple[int, object]:
    response = await within(reactor, http.request(kwargs.pop("method", "GET"), url, **kwargs))
    return response.code, json.loads(await within(reactor, response.content()))


async def read_timed(reactor, response, on_first=lambda: None) -> list[tuple[float, bytes]]:
    """Every piece of a streamed body with its arrival time (``time.monotonic()``)."""
    pieces: list[tuple[float, bytes]] = []

    def received(data: bytes) -> None:
        if not pieces:
            on_first()
        pieces.append((time.monotonic(), data))

    await within(reactor, treq.collect(response, received))
    return pieces


def sse_events(pieces: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """Each SSE event's data with the arrival time of the piece that completed it; checks framing."""
    buffer, found = b"", []
    for arrived, data in pieces:
        buffer += data
        *complete, buffer = buffer.split(b"\n\n")
        for event in complete:
            assert event.startswith(b"data: ") and b"\n" not in event, event
            found.append((arrived, event[len(b"data: ") :]))
    assert buffer == b"", "stream ended inside an event"
    return found


async def stream_chat(reactor, http, url: str, **body):
    """POST a streamed chat completion; the response once its headers (checked here) arrived."""
    response = await within(
        reactor, http.post(url + CHAT_PATH, json={"messages": HELLO, "stream": True, **body}, unbuffered=True)
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    return response


@pytest_twisted.ensureDeferred
async def test_health_models_and_tags(reactor, http, devnode_factory):
    running = devnode_factory(name="n1", models=("a-7b", "b-13b"))
    assert await get_json(reactor, http, running.url + "/health") == (
        200,
        {"status": "ok", "node": "n1", "model_ready": True},
    )
    code, models = await get_json(reactor, http, running.url + "/v1/models")
    assert code == 200 and models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        ("a-7b", "model", "blyan-devnode"),
        ("b-13b", "model", "blyan-devnode"),
    ]
    assert all(isinstance(m["created"], int) for m in models["data"])
    code, tags = await get_json(reactor, http, running.url + "/api/tags")
    assert code == 200 and [(m["name"], m["model"]) for m in tags["models"]] == [
        ("a-7b", "a-7b"),
        ("b-13b", "b-13b"),
    ]
    assert {"modified_at", "size", "digest", "details"} <= set(tags["models"][0])


@pytest_twisted.ensureDeferred
async def test_sse_events_arrive_one_by_one_while_the_node_generates(reactor, http, devnode_factory):
    running = devnode_factory(tokens_per_second=20, ttft_ms=50, max_tokens=8)
    started = time.monotonic()
    response = await stream_chat(reactor, http, running.url)
    streams_open_at_first_piece = []
    pieces = await read_timed(
        reactor, response, lambda: streams_open_at_first_piece.append(running.node.stats.open_streams)
    )
    found = sse_events(pieces)
    assert found[-1][1] == b"[DONE]"
    chunks = [json.loads(data) for _, data in found[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == completion_text(8)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert streams_open_at_first_piece == [1]  # the first event came while the node was still generating
    first, last = found[0][0], found[-1][0]
    schedule = 0.05 + 7 / 20
    assert last - first >= 0.5 * 7 / 20  # spread out, not delivered at the end in one burst
    assert last - started >= 0.7 * schedule
    assert running.node.stats.streams_completed == 1


@pytest_twisted.ensureDeferred
async def test_token_rate_is_roughly_honoured(reactor, http, devnode_factory):
    running = devnode_factory(tokens_per_second=100, ttft_ms=0)
    started = time.monotonic()
    response = await stream_chat(reactor, http, running.url, max_tokens=40)
    found = sse_events(await read_timed(reactor, response))
    elapsed = time.monotonic() - started
    assert len(found) == 42  # 40 tokens, the finish chunk, [DONE]
    assert elapsed >= 0.7 * 39 / 100


@pytest_twisted.ensureDeferred
async def test_openai_client_non_streamed(reactor, devnode_factory):
    from openai import OpenAI

    running = devnode_factory(ttft_ms=0, tokens_per_second=1000)

    def ask():
        with OpenAI(base_url=running.url + "/v1", api_key="sk-test", max_retries=0, timeout=WAIT) as client:
            return client.chat.completions.create(model="blyan-sim-7b", messages=HELLO, max_tokens=5)

    completion = await within(reactor, deferToThread(ask), 2 * WAIT)
    assert completion.id.startswith("chatcmpl-") and completion.model == "blyan-sim-7b"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == completion_text(5)
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 5)


@pytest_twisted.ensureDeferred
async def test_openai_client_streamed(reactor, devnode_factory):
    from openai import OpenAI

    running = devnode_factory(ttft_ms=0, tokens_per_second=1000, max_tokens=6)

    def ask():
        with OpenAI(base_url=running.url + "/v1", api_key="sk-test", max_retries=0, timeout=WAIT) as client:
            stream = client.chat.completions.create(
                model="blyan-sim-7b", messages=HELLO, stream=True, stream_options={"include_usage": True}
            )
            return list(stream)

    chunks = await within(reactor, deferToThread(ask), 2 * WAIT)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion_text(6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 6


@pytest_twisted.ensureDeferred
async def test_ollama_generate_streams_ndjson(reactor, http, devnode_factory):
    running = devnode_factory(ttft_ms=0, tokens_per_second=1000)
    request = {"model": "blyan-sim-7b", "prompt": "why", "options": {"num_predict": 3}}
    response = await within(reactor, http.post(running.url + "/api/generate", json=request, unbuffered=True))
    assert response.headers.getRawHeaders("content-type") == ["application/x-ndjson"]
    body = b"".join(data for _, data in await read_timed(reactor, response))
    lines = [json.loads(line) for line in body.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert "".join(line["response"] for line in lines) == completion_text(3)
    assert lines[-1]["done_reason"] == "length"
    code, whole = await get_json(
        reactor, http, running.url + "/api/generate", method="POST", json={**request, "stream": False}
    )
    assert code == 200 and whole["done"] is True and whole["response"] == completion_text(3)


@pytest_twisted.ensureDeferred
async def test_fail_status(reactor, http, devnode_factory):
    running = devnode_factory(fail_status=503)
    response = await within(reactor, http.post(running.url + CHAT_PATH, json={"messages": HELLO}))
    assert response.code == 503 and response.headers.getRawHeaders("retry-after") == ["1"]
    body = json.loads(await within(reactor, response.content()))
    assert body == {"error": {"message": "injected failure", "type": "server_error", "code": 503}}
    assert (await get_json(reactor, http, running.url + "/health"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_close_after_leaves_the_client_with_an_incomplete_body(reactor, http, devnode_factory):
    running = devnode_factory(ttft_ms=0, tokens_per_second=200, max_tokens=50, close_after=3)
    response = await stream_chat(reactor, http, running.url)
    pieces: list[bytes] = []
    with pytest.raises(ResponseFailed):
        await within(reactor, treq.collect(response, pieces.append))
    events = b"".join(pieces).split(b"\n\n")
    assert len(events) == 4 and events[-1] == b""  # 3 whole events, then nothing
    await eventually(reactor, lambda: running.node.stats.open_connections == 0)
    assert (running.node.stats.streams_dropped, running.node.stats.streams_completed) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_hang_answers_nothing_and_cleans_up_when_the_client_leaves(reactor, http, devnode_factory):
    running = devnode_factory(hang=True)
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        await http.post(running.url + CHAT_PATH, json={"messages": HELLO, "stream": True}, timeout=0.3)
    await eventually(reactor, lambda: running.node.stats.hanging == 0)
    assert running.node.stats.requests == 1 and running.node.stats.connections_lost == 1
    assert devnode_timers(reactor) == []


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_stream_is_counted_and_its_timer_cancelled(reactor, devnode_factory):
    running = devnode_factory(ttft_ms=0, tokens_per_second=20, max_tokens=100)
    client = await connect(reactor, running.url)
    body = b'{"messages":[{"content":"x"}],"stream":true}'
    client.transport.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await eventually(reactor, lambda: client.received.count(b"data: ") >= 2)
    client.transport.abortConnection()
    await eventually(reactor, lambda: running.node.stats.streams_aborted == 1)
    assert running.node.stats.open_streams == 0 and len(running.node.stats.aborted_at) == 1
    assert devnode_timers(reactor) == []


@pytest_twisted.ensureDeferred
async def test_slow_and_unhealthy_health(reactor, http, devnode_factory):
    running = devnode_factory(health_delay_ms=300)
    started = time.monotonic()
    assert (await get_json(reactor, http, running.url + "/health"))[0] == 200
    assert time.monotonic() - started >= 0.25
    running.node.configure(health_status=503, health_delay_ms=0)
    assert await get_json(reactor, http, running.url + "/health") == (
        503,
        {"status": "unhealthy", "node": "devnode", "model_ready": False},
    )


@pytest_twisted.ensureDeferred
async def test_knobs_per_request_by_header_and_by_query(reactor, http, devnode_factory):
    running = devnode_factory(ttft_ms=0, tokens_per_second=1000)
    code, body = await get_json(
        reactor, http, running.url + "/v1/models", headers={"X-Devnode-Fail-Status": "502"}
    )
    assert code == 502 and body["error"]["code"] == 502
    code, body = await get_json(
        reactor, http, running.url + CHAT_PATH + "?devnode_tokens=2", method="POST", json={"messages": HELLO}
    )
    assert code == 200 and body["choices"][0]["message"]["content"] == completion_text(2)
    code, body = await get_json(reactor, http, running.url + "/v1/models?devnode_close_after=soon")
    assert code == 400 and "close_after" in body["error"]["message"]
    assert running.node.config.max_tokens == 16


@pytest_twisted.ensureDeferred
async def test_config_endpoint(reactor, http, devnode_factory):
    running = devnode_factory()
    code, body = await get_json(
        reactor, http, running.url + "/_devnode/config", method="POST", json={"health_status": 503}
    )
    assert code == 200 and body["health_status"] == 503 and running.node.config.health_status == 503
    assert (await get_json(reactor, http, running.url + "/health"))[0] == 503
    code, body = await get_json(
        reactor, http, running.url + "/_devnode/config", method="POST", json={"health": 1}
    )
    assert code == 400 and "health" in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_echo_is_byte_exact(reactor, devnode_factory):
    running = devnode_factory()
    client = await connect(reactor, running.url)
    client.transport.write(
        b"PATCH /_devnode/echo/a%2Fb/%7E?q=%2F&q=2 HTTP/1.1\r\n"
        b"Host: devnode\r\n"
        b"X-Rep: one\r\n"
        b"Accept: */*\r\n"
        b"X-Rep: two\r\n"
        b"X-Devnode-Set-Header: Set-Cookie: a=1; Path=/\r\n"
        b"X-Devnode-Set-Header: Set-Cookie: b=2\r\n"
        b"Content-Length: 4\r\n"
        b"Connection: close\r\n\r\n\x00\xe9\r\n"
    )
    raw = await client.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert [line for line in head.split(b"\r\n") if line.lower().startswith(b"set-cookie:")] == [
        b"Set-Cookie: a=1; Path=/",
        b"Set-Cookie: b=2",
    ]
    echoed = json.loads(body)
    assert echoed["method"] == "PATCH" and echoed["uri"] == "/_devnode/echo/a%2Fb/%7E?q=%2F&q=2"
    assert [name for name, _ in echoed["headers"]][:4] == ["Host", "X-Rep", "Accept", "X-Rep"]
    assert [value for name, value in echoed["headers"] if name == "X-Rep"] == ["one", "two"]
    assert (echoed["body"].encode("latin-1"), echoed["body_length"]) == (b"\x00\xe9\r\n", 4)
    assert echoed["client"] == "127.0.0.1"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_bytes_body_is_complete_for_a_reader(reactor, http, devnode_factory, chunked):
    running = devnode_factory()
    size = (1 << 20) + 123
    response = await within(reactor, http.get(f"{running.url}/_devnode/bytes?size={size}&chunked={chunked}"))
    assert response.length == (UNKNOWN_LENGTH if chunked == "1" else size)  # Content-Length or chunked
    body = await within(reactor, response.content())
    assert len(body) == size and body[:256] == bytes(range(256))
    assert running.node.stats.bytes_sent == size


@pytest_twisted.ensureDeferred
async def test_bytes_stall_when_the_client_does_not_read(reactor, devnode_factory):
    running = devnode_factory()
    size = 64 << 20
    client = await connect(reactor, running.url)
    client.transport.pauseProducing()  # read nothing
    client.transport.write(b"GET /_devnode/bytes?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
    await eventually(reactor, lambda: running.node.stats.bytes_sent > 0)
    await sleep(reactor, 0.3)
    stalled_at = running.node.stats.bytes_sent
    await sleep(reactor, 0.1)
    assert running.node.stats.bytes_sent == stalled_at  # not growing any more
    assert stalled_at < size // 4
    client.transport.abortConnection()
    await eventually(reactor, lambda: running.node.stats.open_connections == 0)


@pytest_twisted.ensureDeferred
async def test_websocket_echo(reactor, devnode_factory):
    from websockets.sync.client import connect

    running = devnode_factory()

    def round_trip():
        url = running.url.replace("http://", "ws://") + "/ws/echo"
        with connect(url, proxy=None, open_timeout=WAIT, close_timeout=WAIT) as websocket:
            websocket.send("héllo")
            text = websocket.recv(timeout=WAIT)
            websocket.send(b"\x00\xff")
            return text, websocket.recv(timeout=WAIT)

    assert await within(reactor, deferToThread(round_trip), 2 * WAIT) == ("héllo", b"\x00\xff")
    assert running.node.stats.websocket_messages == 2
    await eventually(reactor, lambda: running.node.stats.open_connections == 0)


@pytest_twisted.ensureDeferred
async def test_stop_ends_every_kind_of_open_connection(reactor, http, devnode_factory):
    running = devnode_factory(ttft_ms=0, tokens_per_second=5, max_tokens=100)
    response = await stream_chat(reactor, http, running.url)
    hung = http.get(running.url + "/v1/models?devnode_hang=1")
    await eventually(reactor, lambda: running.node.stats.hanging == 1)
    await within(reactor, running.stop())
    assert running.node.stats.open_connections == 0 and running.node.stats.streams_aborted == 1
    assert devnode_timers(reactor) == []
    with pytest.raises(ResponseFailed):
        await within(reactor, treq.collect(response, lambda data: None))
    with pytest.raises(ResponseNeverReceived):
        await within(reactor, hung)
    with pytest.raises(ConnectionRefusedError):
        await within(reactor, http.get(running.url + "/health"))
    await within(reactor, running.stop())  # a second stop is harmless


def test_plugins_are_discoverable():
    assert {"blyan-proxy", "blyan-devnode"} <= {maker.tapname for maker in getPlugins(IServiceMaker)}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("runner", [TWISTD, TWIST], ids=["twistd", "twist"])
async def test_plugin_help(reactor, runner):
    out, err, code = await within(
        reactor,
        getProcessOutputAndValue(runner[0], runner[1:] + ["blyan-devnode", "--help"], env=dict(os.environ)),
        30,
    )
    assert code == 0, err
    assert b"--tps=" in out and b"--close-after=" in out and b"--hang" in out


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_plugin_runs_a_node(reactor, http):
    port = free_port()
    process = ProcessCapture()
    argv = TWIST + [
        "blyan-devnode",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--name",
        "spawned",
        "--models",
        "x,y",
    ]
    transport = reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                code, body = await get_json(reactor, http, f"http://127.0.0.1:{port}/health")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, process.output.decode(errors="replace")
                await sleep(reactor, 0.1)
        assert (code, body["node"]) == (200, "spawned")
        code, models = await get_json(reactor, http, f"http://127.0.0.1:{port}/v1/models")
        assert [m["id"] for m in models["data"]] == ["x", "y"]
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
        await within(reactor, process.ended, 10)
