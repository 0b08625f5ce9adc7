"""Graceful stop and reload of a real ``twistd -n blyan-proxy`` child process.

SIGTERM during an open stream: the stream completes, the process exits 0, the
state file is intact. SIGHUP re-reads ENV_FILE: nodes come and go while a
stream stays open.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionRefusedError

from .processes import TWISTD, ProcessCapture, free_port
from .rawhttp import connect, eventually, sleep
from .test_forwarding import chat_request, sse_events

WAIT = 30.0


class ProxyProcess:
    """A ``twistd -n blyan-proxy`` child on a free loopback port, stopped by PID at the end."""

    def __init__(self, reactor, tmp_path, env: dict, args=()):
        self.reactor = reactor
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = tmp_path / "state.json"
        self.capture = ProcessCapture()
        argv = TWISTD + ["--pidfile=", "blyan-proxy", "--port", f"tcp:{self.port}:interface=127.0.0.1",
                         "--state-file", str(self.state), *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
        environment.update(HEALTH_INTERVAL_MS="60000", **env)
        self.transport = reactor.spawnProcess(self.capture, argv[0], argv, env=environment, path=str(tmp_path))

    async def ready(self):
        for _ in range(300):
            try:
                response = await treq.get(self.url + "/_status", timeout=5)
                await response.content()
                return
            except ConnectionRefusedError:
                await sleep(self.reactor, 0.1)
        raise AssertionError("the proxy did not start:\n" + self.output)

    @property
    def output(self) -> str:
        return self.capture.output.decode(errors="replace")

    def signal(self, number: int) -> None:
        self.transport.signalProcess(number)

    async def ended(self):
        return await self.capture.ended.addTimeout(WAIT, self.reactor)

    async def stop(self):
        if not self.capture.ended.called:
            self.transport.signalProcess(signal.SIGKILL)
            await self.ended()


@pytest.fixture
def proxy_process(reactor, tmp_path):
    """Start ``ProxyProcess`` children; each is killed by PID at teardown if still running."""
    started = []

    def start(env: dict, args=()):
        started.append(ProxyProcess(reactor, tmp_path, env, args))
        return started[-1]

    yield start
    for process in started:
        pytest_twisted.blockon(ensureDeferred(process.stop()))


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sigterm_lets_an_open_stream_finish_then_exits_0(reactor, devnode_factory, proxy_process):
    node = devnode_factory(tokens_per_second=8.0, ttft_ms=0.0)
    proxy = proxy_process({"NODE_0": f"gpu|{node.url}", "DRAIN_GRACE_MS": "20000"})
    await proxy.ready()
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=12))  # about 1.5 s of tokens
    await client.wait_for(b"chat.completion.chunk", timeout=10)

    proxy.signal(signal.SIGTERM)

    async def refused() -> bool:
        try:
            await treq.get(proxy.url + "/_status", timeout=2)
        except ConnectionRefusedError:
            return True
        return False

    for _ in range(100):  # no new connection is accepted while the stream goes on
        if await refused():
            break
        await sleep(reactor, 0.05)
    else:
        raise AssertionError("the proxy kept accepting connections:\n" + proxy.output)
    assert b"data: [DONE]" not in client.received, "the stream ended before the listener closed"
    received = await client.wait_closed(timeout=WAIT)
    events = sse_events(received)
    assert events[-1] == b"[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert received.endswith(b"0\r\n\r\n")  # a complete chunked body, then the connection closed
    code, killed_by = await proxy.ended()
    assert (code, killed_by) == (0, None), proxy.output
    assert "draining 1 request(s) on " in proxy.output
    assert "drained in" in proxy.output
    assert "Traceback" not in proxy.output
    saved = json.loads(proxy.state.read_text())
    assert [n["baseURL"] for n in saved["nodes"]] == [node.url]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_stream_longer_than_the_grace_is_cut_and_the_exit_is_still_clean(
    reactor, devnode_factory, proxy_process
):
    node = devnode_factory(tokens_per_second=1.0, ttft_ms=0.0)
    proxy = proxy_process({"NODE_0": f"gpu|{node.url}", "DRAIN_GRACE_MS": "300"})
    await proxy.ready()
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=60))
    await client.wait_for(b"chat.completion.chunk", timeout=10)
    proxy.signal(signal.SIGTERM)
    received = await client.wait_closed(timeout=WAIT)
    assert b"data: [DONE]" not in received
    assert (await proxy.ended()) == (0, None), proxy.output
    assert "aborted 1 connection(s) after the 0.3 s grace" in proxy.output
    assert json.loads(proxy.state.read_text())["nodes"][0]["baseURL"] == node.url


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sighup_rereads_the_env_file_without_dropping_a_stream(
    reactor, tmp_path, devnode_factory, proxy_process
):
    first = devnode_factory(name="first", tokens_per_second=10.0, ttft_ms=0.0)
    second = devnode_factory(name="second")
    env_file = tmp_path / "proxy.env"
    env_file.write_text(f"NODE_0=first|{first.url}\nLOG_LEVEL=INFO\n")
    proxy = proxy_process({"ENV_FILE": str(env_file)})
    await proxy.ready()
    client = await connect(reactor, proxy.url)
    client.transport.write(chat_request(max_tokens=20))  # about 2 s on the first node
    await client.wait_for(b"chat.completion.chunk", timeout=10)

    async def node_names():
        response = await treq.get(proxy.url + "/_status", timeout=5)
        await response.content()
        saved = json.loads(proxy.state.read_text())
        return [n["name"] for n in saved["nodes"]]

    # The first node's declaration goes, a second one comes, and a restart-only setting changes.
    env_file.write_text(f"NODE_1=second|{second.url}\nMAX_ATTEMPTS=2\n")
    proxy.signal(signal.SIGHUP)
    await eventually(reactor, lambda: "reloaded" in proxy.output, timeout=10)
    assert await node_names() == ["second"]
    assert "MAX_ATTEMPTS changed; restart to apply" in proxy.output
    response = await treq.get(proxy.url + "/_devnode/echo", timeout=5)
    assert response.headers.getRawHeaders("X-Blyan-Node") == ["second"]
    await response.content()

    # A broken file changes nothing.
    env_file.write_text("this is not a setting\n")
    proxy.signal(signal.SIGHUP)
    await eventually(reactor, lambda: "nothing changed" in proxy.output, timeout=10)
    assert f"{env_file} line 1: expected NAME=value" in proxy.output
    assert await node_names() == ["second"]

    received = await client.wait_for(b"data: [DONE]", timeout=WAIT)  # the open stream never noticed
    assert json.loads(sse_events(received)[-2])["choices"][0]["finish_reason"] == "length"
    proxy.signal(signal.SIGTERM)
    assert (await proxy.ended()) == (0, None), proxy.output
