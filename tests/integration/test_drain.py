"""The graceful stop in-process: real sockets, the grace on a ``task.Clock``."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from blyanproxy.config import NodeSpec, Settings
from blyanproxy.serve.drain import ConnectionTracker, Drainer
from blyanproxy.tap import build_proxy

from .rawhttp import connect, eventually
from .test_forwarding import chat_request

KEEPALIVE_GET = b"GET /_status HTTP/1.1\r\nHost: x\r\n\r\n"
WEBSOCKET_UPGRADE = (b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Listening(Service):
    """Listens on 127.0.0.1:0 while running."""

    def __init__(self, reactor, factory):
        self._reactor, self._factory, self.port = reactor, factory, None

    def startService(self):
        super().startService()
        self.port = self._reactor.listenTCP(0, self._factory, interface="127.0.0.1")

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


class Recorder(Service):
    """Notes when it is stopped, in a shared list of events."""

    def __init__(self, events):
        self._events = events

    def stopService(self):
        super().stopService()
        self._events.append("stopped")


@attrs.define
class DrainingProxy:
    """A proxy under a ``Drainer`` whose grace runs on ``clock``."""

    drainer: Drainer
    tracker: ConnectionTracker
    listener: Listening
    clock: Clock
    events: list
    parts: object
    url: str


@pytest.fixture
def draining_proxy(reactor):
    """``draining_proxy(node_url, grace=10.0)``: a started proxy; stopped (and its pool closed) at teardown."""
    made = []

    def start(node_url, grace=10.0, **overrides):
        settings = attrs.evolve(Settings(), nodes=(NodeSpec("node0", node_url, "test"),), **overrides)
        parts = build_proxy(settings, reactor, persist=False)
        tracker = ConnectionTracker(parts.site)
        events, clock = [], Clock()
        drainer = Drainer(tracker, clock, grace, save=lambda: events.append("saved"))
        drainer.before_drain = parts.admission.admission.queue.close  # as tap.make_proxy_service wires it
        Recorder(events).setServiceParent(drainer)
        listener = Listening(reactor, tracker)
        drainer.add_listener(listener)
        drainer.startService()
        url = f"http://127.0.0.1:{listener.port.getHost().port}"
        made.append(DrainingProxy(drainer, tracker, listener, clock, events, parts, url))
        return made[-1]

    yield start
    for proxy in made:
        if proxy.drainer.running:
            proxy.clock.advance(10_000)
            pytest_twisted.blockon(proxy.drainer.stopService())
        pytest_twisted.blockon(ensureDeferred(proxy.parts.pool.close()))


def stop(proxy):
    """Stop the drainer; the Deferred fires (with None) once everything has stopped."""
    stopping = proxy.drainer.stopService()
    stopping.addCallback(lambda _: proxy.events.append("all stopped"))
    return stopping


async def refused(reactor, url) -> bool:
    try:
        client = await connect(reactor, url)
    except ConnectionRefusedError:
        return True
    client.transport.loseConnection()
    return False


@pytest_twisted.ensureDeferred
async def test_idle_connections_close_at_once_busy_ones_after_their_response(reactor, devnode_factory,
                                                                            draining_proxy):
    node = devnode_factory(tokens_per_second=20.0, ttft_ms=0.0)
    proxy = draining_proxy(node.url)
    idle = await connect(reactor, proxy.url)
    idle.transport.write(KEEPALIVE_GET)
    await idle.wait_for(b'"policy"')
    streaming = await connect(reactor, proxy.url)
    streaming.transport.write(chat_request(max_tokens=10))
    await streaming.wait_for(b"chat.completion.chunk")
    assert proxy.tracker.busy() == 1

    stopped = stop(proxy)
    await idle.wait_closed()
    assert await refused(reactor, proxy.url)
    assert proxy.events == []
    received = await streaming.wait_closed(timeout=10)
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    await stopped
    assert proxy.events == ["saved", "stopped", "all stopped"]


@pytest_twisted.ensureDeferred
async def test_a_response_that_starts_during_the_drain_says_connection_close(reactor, devnode_factory,
                                                                            draining_proxy):
    node = devnode_factory(ttft_ms=300.0, tokens_per_second=1000.0)
    proxy = draining_proxy(node.url)
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=3, stream=False))
    await eventually(reactor, lambda: proxy.tracker.busy() == 1)
    stopped = stop(proxy)
    received = await client.wait_closed(timeout=10)
    head = received.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200") and b"\r\nconnection: close" in head
    await stopped


@pytest_twisted.ensureDeferred
async def test_after_the_grace_streams_and_websockets_are_cut(reactor, devnode_factory, draining_proxy):
    node = devnode_factory(tokens_per_second=1.0, ttft_ms=0.0)
    proxy = draining_proxy(node.url, grace=5.0)
    stream = await connect(reactor, proxy.url)
    stream.transport.write(chat_request(max_tokens=100))
    await stream.wait_for(b"chat.completion.chunk")
    socket = await connect(reactor, proxy.url)
    socket.transport.write(WEBSOCKET_UPGRADE)
    await socket.wait_for(b"\r\n\r\n")
    assert socket.received.startswith(b"HTTP/1.1 101")
    assert proxy.tracker.busy() == 2

    stopped = stop(proxy)
    await eventually(reactor, lambda: proxy.tracker.draining)  # the listener has stopped
    proxy.clock.advance(4.9)
    assert proxy.events == [] and not stream.closed.called and not socket.closed.called
    proxy.clock.advance(0.2)
    await stream.wait_closed()
    await socket.wait_closed()
    await stopped
    assert b"data: [DONE]" not in stream.received
    assert proxy.events == ["saved", "stopped", "all stopped"]
    assert proxy.tracker.busy() == 0


@pytest_twisted.ensureDeferred
async def test_requests_still_queued_are_answered_503_before_the_grace(reactor, devnode_factory, draining_proxy):
    node = devnode_factory(tokens_per_second=50.0, ttft_ms=0.0)
    proxy = draining_proxy(node.url, node_max_inflight=1)
    streaming = await connect(reactor, proxy.url)
    streaming.transport.write(chat_request(max_tokens=100000))
    await streaming.wait_for(b"chat.completion.chunk")
    queued = await connect(reactor, proxy.url)
    queued.transport.write(chat_request(max_tokens=3))
    queue = proxy.parts.admission.admission.queue
    await eventually(reactor, lambda: len(queue) == 1)
    stopped = stop(proxy)
    received = await queued.wait_closed()  # the grace has not begun to run out: the clock stands still
    assert received.startswith(b"HTTP/1.1 503") and b'"shutting_down"' in received
    assert node.node.stats.by_path["/v1/chat/completions"] == 1
    proxy.clock.advance(10.0)
    await stopped
