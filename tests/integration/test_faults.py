"""Faults, each with simulated nodes over real sockets: nothing hangs, nothing is lost that could be kept.

Nodes die mid-stream, hang, stall after their headers or flap under load; the
state directory refuses writes. The client always gets either its answer or a
clear error, failover covers every request that had a healthy alternative
before its first byte, and in-flight counts return to zero.
"""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.error import ConnectionRefusedError

from blyanproxy.devnode import DevNode, DevNodeConfig

from .processes import TWISTD, ProcessCapture, free_port
from .rawhttp import connect, eventually, sleep
from .test_admin import AUTH, TOKEN, call
from .test_forwarding import chat_request


def in_flight(proxy) -> int:
    return sum(proxy.registry.stats(node.id).in_flight for node in proxy.registry.nodes())


def head_of(received: bytes) -> bytes:
    return received.partition(b"\r\n\r\n")[0]


@pytest_twisted.ensureDeferred
async def test_node_killed_mid_stream_ends_each_stream_with_an_error_and_the_next_go_elsewhere(
        reactor, devnode_factory, proxy_factory):
    doomed = devnode_factory(name="doomed", tokens_per_second=20.0, ttft_ms=0.0)
    spare = devnode_factory(name="spare", tokens_per_second=500.0, ttft_ms=0.0)
    proxy = await proxy_factory([doomed.url, spare.url], selection_policy="active-first")
    clients = [await connect(reactor, proxy.url) for _ in range(5)]
    for client in clients:
        client.transport.write(chat_request(max_tokens=200))
    for client in clients:
        await client.wait_for(b"chat.completion.chunk")
    await doomed.stop()  # the node's process is gone: listening socket and every connection
    for client in clients:
        received = await client.wait_closed(timeout=5)
        assert b"X-Blyan-Node: node0" in head_of(received)
        assert b"event: error" in received and b"upstream_broke" in received
        assert b"[DONE]" not in received
    for _ in range(5):
        response = await treq.post(proxy.url + "/v1/chat/completions", data=chat_request(3).split(b"\r\n\r\n")[1],
                                   timeout=5)
        assert response.code == 200 and response.headers.getRawHeaders("X-Blyan-Node") == ["node1"]
        assert b"[DONE]" in await response.content()
    await eventually(reactor, lambda: in_flight(proxy) == 0)


@pytest_twisted.ensureDeferred
async def test_a_node_that_accepts_and_never_answers(reactor, devnode_factory, proxy_factory):
    hung = devnode_factory(name="hung", hang=True)
    alone = await proxy_factory([hung.url], proxy_timeout=0.3)
    response = await treq.get(alone.url + "/v1/models", timeout=5)
    assert response.code == 504 and (await response.json())["error"]["code"] == "upstream_timeout"
    spare = devnode_factory(name="spare")
    with_spare = await proxy_factory([hung.url, spare.url], proxy_timeout=0.3)
    response = await treq.get(with_spare.url + "/v1/models", timeout=5)
    assert response.code == 200 and response.headers.getRawHeaders("X-Blyan-Attempts") == ["2"]
    await eventually(reactor, lambda: hung.node.stats.hanging == 0)  # the proxy let go of the node
    assert in_flight(alone) == 0 and in_flight(with_spare) == 0


@pytest_twisted.ensureDeferred
async def test_a_node_that_sends_headers_then_stalls(reactor, devnode_factory, proxy_factory):
    stalled = devnode_factory(name="stalled", ttft_ms=60_000.0)
    proxy = await proxy_factory([stalled.url], idle_timeout=0.3)
    sse = await connect(reactor, proxy.url)
    sse.transport.write(chat_request(max_tokens=5))
    received = await sse.wait_closed(timeout=5)
    assert b"HTTP/1.1 200" in received and b"event: error" in received and b"idle_timeout" in received
    ndjson = await connect(reactor, proxy.url)
    body = b'{"model": "blyan-sim-7b", "prompt": "hi", "stream": true}'
    ndjson.transport.write(b"POST /api/api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                           % (len(body), body))
    received = await ndjson.wait_closed(timeout=5)
    assert b"HTTP/1.1 200" in received and b"Transfer-Encoding: chunked" in received
    assert not received.endswith(b"0\r\n\r\n")  # a broken chunked body, never a complete empty one
    await eventually(reactor, lambda: stalled.node.stats.open_streams == 0 and in_flight(proxy) == 0)


class Flapper:
    """A node that goes down (port closed, connections cut) and up again on the same port."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.node = DevNode(DevNodeConfig(name="flapper", tokens_per_second=400.0, ttft_ms=0.0), reactor)
        self.listening = reactor.listenTCP(0, self.node.site(), interface="127.0.0.1")
        self.port = self.listening.getHost().port
        self.flips = 0

    async def down(self) -> None:
        await self.listening.stopListening()
        self.listening = None
        await self.node.disconnect_all()

    def up(self) -> None:
        self.listening = self.reactor.listenTCP(self.port, self.node.site(), interface="127.0.0.1")

    async def flap(self, period: float, until: float) -> None:
        while self.reactor.seconds() < until:
            await sleep(self.reactor, period)
            if self.listening is None:
                self.up()
            else:
                await self.down()
            self.flips += 1

    async def stop(self) -> None:
        if self.listening is not None:
            await self.down()


@pytest_twisted.ensureDeferred
async def test_a_flapping_node_under_steady_load_fails_no_request_that_had_an_alternative(
        reactor, devnode_factory, proxy_factory):
    steady = devnode_factory(name="steady", tokens_per_second=400.0, ttft_ms=0.0)
    flapper = Flapper(reactor)
    try:
        proxy = await proxy_factory(
            # The flapper refuses at once when it is down; the timeout is long so that a slow probe of
            # the steady node on a loaded machine never counts as a failure (health_fall=1).
            [f"http://127.0.0.1:{flapper.port}", steady.url], health_checks=True, health_interval=0.2,
            health_timeout=2.0, health_rise=1, health_fall=1, eject_cooldown=0.3, eject_cooldown_max=0.5,
            selection_policy="round-robin", connect_timeout=0.5,
        )
        until = reactor.seconds() + 4.0
        outcomes = []

        async def worker():
            while reactor.seconds() < until:
                client = await connect(reactor, proxy.url)
                client.transport.write(chat_request(max_tokens=4).replace(b"Host: x", b"Host: x\r\nConnection: close"))
                outcomes.append(await client.wait_closed(timeout=10))

        await gatherResults([ensureDeferred(flapper.flap(0.5, until))] +
                            [ensureDeferred(worker()) for _ in range(8)])
    finally:
        await flapper.stop()
    completed = [r for r in outcomes if b"data: [DONE]" in r and r.endswith(b"0\r\n\r\n")]
    broken = [r for r in outcomes if r not in completed]
    assert flapper.flips >= 6 and len(outcomes) > 100
    for received in broken:
        # Only a stream the flapping node had already started may break, and it says so.
        head = head_of(received)
        assert b"HTTP/1.1 200" in head and b"X-Blyan-Node: node0" in head, received[:400]
        assert b"event: error" in received
    print(f"flapping: {len(outcomes)} requests, {len(completed)} completed, {len(broken)} broken mid-stream "
          f"on the flapping node, 0 failed before the first byte")
    await eventually(reactor, lambda: in_flight(proxy) == 0)


def failing_save(why: int):
    def save(state):
        raise OSError(why, os.strerror(why))
    return save


@pytest_twisted.ensureDeferred
async def test_a_read_only_state_directory_refuses_admin_changes_and_keeps_serving(
        reactor, devnode_factory, proxy_factory, tmp_path):
    node = devnode_factory(name="gpu")
    state_file = tmp_path / "state.json"
    proxy = await proxy_factory([node.url], persist=True, admin_token=TOKEN, state_file=str(state_file))
    _, listed = await call(proxy, "GET", "/_admin/nodes")
    node_id = listed["nodes"][0]["id"]
    saved = state_file.read_bytes()
    store = proxy.parts.store
    working_save, store.save = store.save, failing_save(errno.EROFS)  # the file system's seam
    attempts = [
        ("POST", "/_admin/nodes", {"name": "new", "baseURL": "http://127.0.0.1:9"}),
        ("PATCH", f"/_admin/nodes/{node_id}", {"weight": 7, "name": "renamed"}),
        ("POST", f"/_admin/nodes/{node_id}/drain", None),
        ("DELETE", f"/_admin/nodes/{node_id}", None),
        ("PUT", "/_admin/policy", {"policy": "round-robin"}),
        ("POST", "/_admin/active/0", None),
    ]
    for method, path, body in attempts:
        response, answer = await call(proxy, method, path, body)
        assert response.code == 503 and answer["code"] == "state_store_unavailable", (method, path, answer)
        assert "Read-only file system" in answer["error"]
        _, now = await call(proxy, "GET", "/_admin/nodes")
        fleet = [(n["id"], n["name"], n["weight"], n["draining"]) for n in now["nodes"]]
        assert fleet == [(node_id, "node0", 1, False)]
    assert (await call(proxy, "GET", "/_admin/policy"))[1]["policy"] == "active-first"
    assert state_file.read_bytes() == saved and os.listdir(tmp_path) == ["state.json"]  # no temporary left
    served = await treq.get(proxy.url + "/v1/models", timeout=5)
    assert served.code == 200
    store.save = working_save  # the disk is fixed: the same change now goes through
    response, answer = await call(proxy, "PATCH", f"/_admin/nodes/{node_id}", {"weight": 7})
    assert response.code == 200 and json.loads(state_file.read_bytes())["nodes"][0]["weight"] == 7


#: twistd with a small file size limit: a write past it fails with EFBIG (Python ignores SIGXFSZ).
FILE_SIZE_LIMIT = 8192


@pytest_twisted.ensureDeferred
async def test_a_full_disk_refuses_admin_changes_in_a_real_process(reactor, devnode_factory, tmp_path):
    node = devnode_factory(name="gpu")
    port = free_port()
    limited = [TWISTD[0], "-c", "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, "
               f"({FILE_SIZE_LIMIT}, {FILE_SIZE_LIMIT})); from twisted.scripts.twistd import run; run()"] + TWISTD[3:]
    argv = limited + ["--pidfile=", "blyan-proxy", "--port", f"tcp:{port}:interface=127.0.0.1"]
    env = dict(os.environ, ADMIN_TOKEN=TOKEN, STATE_FILE=str(tmp_path / "state.json"), NODE_0=f"gpu|{node.url}")
    process = ProcessCapture()
    transport = reactor.spawnProcess(process, argv[0], argv, env=env, path=str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                await treq.get(url + "/health", timeout=5)
                break
            except ConnectionRefusedError:
                await sleep(reactor, 0.1)
        saved = (tmp_path / "state.json").read_bytes()
        big = {"name": "big", "baseURL": "http://127.0.0.1:9", "metadata": {"notes": "x" * 12000}}
        response = await treq.post(url + "/_admin/nodes", json=big, headers=AUTH, timeout=5)
        answer = await response.json()
        assert response.code == 503 and answer["code"] == "state_store_unavailable" and "too large" in answer["error"]
        listed = await (await treq.get(url + "/_admin/nodes", headers=AUTH, timeout=5)).json()
        assert [n["name"] for n in listed["nodes"]] == ["gpu"]
        assert (tmp_path / "state.json").read_bytes() == saved
        assert os.listdir(tmp_path) == ["state.json"]  # no half-written temporary left
        served = await treq.get(url + "/v1/models", timeout=5)
        assert served.code == 200
        small = await treq.post(url + "/_admin/nodes", json={"name": "small", "baseURL": "http://127.0.0.1:9"},
                                headers=AUTH, timeout=5)
        assert small.code == 200 and b'"small"' in (tmp_path / "state.json").read_bytes()
    finally:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
        await process.ended.addTimeout(30, reactor)
    assert b"could not save the fleet" in process.output and b"Traceback" not in process.output


@pytest_twisted.ensureDeferred
async def test_requests_waiting_on_a_frozen_node_fail_over_once_health_marks_it_down(
        reactor, devnode_factory, proxy_factory):
    # A devnode in a process of its own, frozen with SIGSTOP: it still accepts connections (the
    # kernel does) and never answers. PROXY_TIMEOUT stays at its 600 s default.
    port = free_port()
    argv = TWISTD + ["--pidfile=", "blyan-devnode", "--port", f"tcp:{port}:interface=127.0.0.1", "--name", "frozen",
                     "--ttft-ms", "0"]
    process = ProcessCapture()
    transport = reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ))
    frozen_url = f"http://127.0.0.1:{port}"
    spare = devnode_factory(name="spare", tokens_per_second=500.0, ttft_ms=0.0)
    frozen = False
    try:
        for _ in range(300):
            try:
                await treq.get(frozen_url + "/health", timeout=5)
                break
            except ConnectionRefusedError:
                await sleep(reactor, 0.1)
        # Health needs about 2 × (1 s + 1 s) to mark the frozen node down: the requests below are
        # sent to it well before that, however loaded the machine (they then fail over, not wait 600 s).
        proxy = await proxy_factory([frozen_url, spare.url], selection_policy="active-first", health_checks=True,
                                    health_interval=1.0, health_timeout=1.0, health_fall=2, health_rise=1)
        frozen_id, spare_id = (node.id for node in proxy.registry.nodes())
        await eventually(reactor, lambda: proxy.registry.stats(frozen_id).health.state == "up")
        os.kill(transport.pid, signal.SIGSTOP)
        frozen = True
        clients = [await connect(reactor, proxy.url) for _ in range(4)]
        for client in clients:  # sent at once: the frozen node is still the active one
            client.transport.write(chat_request(max_tokens=3))
        for client in clients:
            received = await client.wait_for(b"data: [DONE]", timeout=20)
            head = head_of(received)
            assert head.startswith(b"HTTP/1.1 200") and b"X-Blyan-Node: node1" in head, head
            assert b"X-Blyan-Attempts: 2" in head  # the frozen node's attempt, abandoned; then the spare's
            client.transport.loseConnection()
        assert proxy.registry.stats(frozen_id).health.state == "down"
        assert proxy.registry.stats(spare_id).failures == 0
        await eventually(reactor, lambda: in_flight(proxy) == 0)
    finally:
        if frozen:
            os.kill(transport.pid, signal.SIGCONT)
        if not process.ended.called:
            os.kill(transport.pid, signal.SIGTERM)
        await process.ended.addTimeout(30, reactor)
