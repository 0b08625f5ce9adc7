"""Proxies sharing one fleet through a real etcd: propagation, concurrent writes, etcd going away."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import formatEvent, globalLogPublisher

from blyanproxy.store.etcdkeys import b64, unb64

from .etcdserver import EtcdServer, location
from .processes import TWISTD, ProcessCapture, free_port
from .rawhttp import eventually, sleep
from .test_admin import TOKEN, call

WAIT = 30.0
#: Generous bound for a change to reach the other proxy (the report measures how long it really takes).
PROPAGATION = 5.0


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """One etcd for the module; each test takes a prefix of its own."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data").start()
    yield server
    server.stop()


@pytest.fixture
def shared_proxies(proxy_factory, reactor):
    """``await shared_proxies(store_url, count, node_urls=())``: proxies on one etcd prefix, in step."""

    async def start(store_url, count=2, node_urls=(), wait=True):
        proxies = []
        for _ in range(count):
            proxies.append(await proxy_factory(node_urls, persist=True, admin_token=TOKEN,
                                               state_store=location(store_url), etcd_timeout=1.0))
        if wait:
            for proxy in proxies:
                await in_step(reactor, proxy)
        return proxies

    return start


async def in_step(reactor, proxy):
    """Wait until ``proxy`` is in step with etcd: until then it refuses every admin write with 503.

    The write that tells sets the policy the proxy already uses, so routing stays as it was.
    """
    for _ in range(int(WAIT / 0.1)):
        policy = (await call(proxy, "GET", "/_admin/policy"))[1]["policy"]
        response, body = await call(proxy, "PUT", "/_admin/policy", {"policy": policy})
        if response.code == 200:
            return
        assert body["code"] in ("state_store_unavailable", "conflict"), body
        await sleep(reactor, 0.1)
    raise AssertionError(f"{proxy.url} never got in step with etcd")


def at_once(*calls):
    """Run admin calls concurrently; their answers, in order."""
    return gatherResults([ensureDeferred(c) for c in calls])


def urls(proxy):
    return sorted(node.base_url for node in proxy.registry.nodes())


async def routed_to(proxy, name):
    response = await treq.get(proxy.url + "/_devnode/echo", timeout=5)
    await response.content()
    return response.code == 200 and response.headers.getRawHeaders("X-Blyan-Node") == [name]


@pytest_twisted.ensureDeferred
async def test_a_node_added_through_one_proxy_is_routed_to_by_the_other(reactor, etcd, shared_proxies,
                                                                         devnode_factory):
    a, b = await shared_proxies(etcd.store_url())
    node = devnode_factory()
    added, body = await call(a, "POST", "/_admin/nodes", {"name": "gpu-a", "baseURL": node.url})
    assert added.code == 200, body
    await eventually(reactor, lambda: urls(b) == [node.url], timeout=PROPAGATION)
    assert await routed_to(b, "gpu-a")
    drained = (await call(b, "POST", f"/_admin/nodes/{body['node']['id']}/drain"))[0]
    assert drained.code == 200
    await eventually(reactor, lambda: a.registry.nodes()[0].draining, timeout=PROPAGATION)
    assert (await treq.get(a.url + "/v1/models", timeout=5)).code == 503
    assert (await call(a, "PUT", "/_admin/policy", {"policy": "round-robin"}))[0].code == 200
    await eventually(reactor, lambda: b.parts.balancer.policy == "round-robin", timeout=PROPAGATION)


@pytest_twisted.ensureDeferred
async def test_etcd_calls_write_no_factory_lines(reactor, etcd, shared_proxies):
    lines = []
    observe = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observe)
    try:
        (proxy,) = await shared_proxies(etcd.store_url(), count=1)
        assert (await call(proxy, "PUT", "/_admin/policy", {"policy": "round-robin"}))[0].code == 200
        await proxy.parts.store_service.stopService()  # the watch and the kept-alive connections close
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any("fleet in step with etcd" in line for line in lines)
    etcd_address = etcd.url.split("/")[2]  # 127.0.0.1:port: the test's own client logs its factories
    assert [line for line in lines if "Starting factory" in line and "127.0.0.1:" in line]  # the check can see
    assert not [line for line in lines if "factory" in line and etcd_address in line], lines


@pytest_twisted.ensureDeferred
async def test_concurrent_writes_through_both_proxies_lose_nothing(reactor, etcd, shared_proxies):
    store_url = etcd.store_url()
    a, b = await shared_proxies(store_url)
    adds = [call(proxy, "POST", "/_admin/nodes", {"name": f"n{i}", "baseURL": f"http://10.1.0.{i}:8000"})
            for i, proxy in enumerate([a, b] * 6)]
    answers = await at_once(*adds)
    accepted = sorted(f"http://10.1.0.{i}:8000" for i, (response, _) in enumerate(answers) if response.code == 200)
    refused = [body["code"] for response, body in answers if response.code != 200]
    assert set(refused) <= {"conflict"} and len(accepted) + len(refused) == 12
    assert len(accepted) >= 10  # a lost race is retried on the fresh fleet
    await eventually(reactor, lambda: urls(a) == urls(b) == accepted, timeout=PROPAGATION)

    # The same URL through both at once: one is added, the other refused as a duplicate.
    same = {"name": "twin", "baseURL": "http://10.2.0.1:8000"}
    first, second = await at_once(call(a, "POST", "/_admin/nodes", same), call(b, "POST", "/_admin/nodes", same))
    assert sorted([first[0].code, second[0].code]) == [200, 409]
    await eventually(reactor, lambda: urls(a) == urls(b) and "http://10.2.0.1:8000" in urls(a),
                     timeout=PROPAGATION)

    # Two changes to one node through both at once: both take effect.
    node_id = a.registry.nodes()[0].id
    weight, tags = await at_once(call(a, "PATCH", f"/_admin/nodes/{node_id}", {"weight": 7}),
                                  call(b, "PATCH", f"/_admin/nodes/{node_id}", {"tags": ["h100"]}))
    assert (weight[0].code, tags[0].code) == (200, 200)
    for proxy in (a, b):
        await eventually(reactor, lambda proxy=proxy: (proxy.registry.get(node_id).weight,
                                                       proxy.registry.get(node_id).tags) == (7, ("h100",)),
                         timeout=PROPAGATION)
    stored = etcd.request("kv/range", {"key": b64(location(store_url).prefix + b"nodes/" + node_id.encode())})
    value = json.loads(unb64(stored["kvs"][0]["value"]))
    assert (value["weight"], value["tags"]) == (7, ["h100"])


@pytest_twisted.ensureDeferred
async def test_a_compacted_watch_reads_the_whole_fleet_again(reactor, etcd, shared_proxies):
    a, b = await shared_proxies(etcd.store_url())
    b.parts.store_service._stream.stop()  # b's watch breaks; it reopens from its revision after a pause
    added = (await call(a, "POST", "/_admin/nodes", {"name": "late", "baseURL": "http://10.3.0.1:8000"}))[0]
    assert added.code == 200
    revision = etcd.request("kv/range", {"key": "AA=="})["header"]["revision"]
    etcd.request("kv/compaction", {"revision": revision, "physical": True})
    await eventually(reactor, lambda: urls(b) == ["http://10.3.0.1:8000"], timeout=PROPAGATION)


@pytest_twisted.ensureDeferred
async def test_losing_etcd_keeps_traffic_flowing_and_refuses_admin_writes(reactor, tmp_path, shared_proxies,
                                                                          devnode_factory):
    server = EtcdServer(tmp_path / "etcd").start()
    try:
        store_url = server.store_url()
        a, b = await shared_proxies(store_url)
        first, second = devnode_factory(), devnode_factory()
        assert (await call(a, "POST", "/_admin/nodes", {"name": "first", "baseURL": first.url}))[0].code == 200
        await eventually(reactor, lambda: urls(b) == [first.url], timeout=PROPAGATION)

        server.stop()
        assert await routed_to(b, "first")  # the last known fleet keeps serving
        refused, body = await call(a, "POST", "/_admin/nodes", {"name": "second", "baseURL": second.url})
        assert (refused.code, body["code"]) == (503, "state_store_unavailable")
        assert urls(a) == [first.url]  # nothing applied
        # A proxy started while etcd is down serves its declared nodes and refuses writes.
        (c,) = await shared_proxies(store_url, count=1, node_urls=[second.url], wait=False)
        assert await routed_to(c, "node0")
        assert (await call(c, "PUT", "/_admin/policy", {"policy": "round-robin"}))[0].code == 503

        server.start()
        # c gets in step: it merges its declared node into the shared fleet; a and b see it, c sees theirs.
        for proxy in (a, b, c):
            await eventually(reactor, lambda proxy=proxy: urls(proxy) == sorted([first.url, second.url]),
                             timeout=WAIT)
        assert (await call(b, "PUT", "/_admin/policy", {"policy": "least-inflight"}))[0].code == 200
        for proxy in (a, c):
            await eventually(reactor, lambda proxy=proxy: proxy.parts.balancer.policy == "least-inflight",
                             timeout=PROPAGATION)
    finally:
        server.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_two_proxy_processes_share_the_fleet(reactor, etcd, tmp_path, devnode_factory):
    store_url = etcd.store_url()
    ports = [free_port(), free_port()]
    processes, transports = [], []
    env = dict(os.environ, ADMIN_TOKEN=TOKEN, STATE_STORE=store_url)
    for port in ports:
        process = ProcessCapture()
        argv = TWISTD + ["--pidfile=", "blyan-proxy", "--port", f"tcp:{port}:interface=127.0.0.1"]
        transports.append(reactor.spawnProcess(process, argv[0], argv, env=env, path=str(tmp_path)))
        processes.append(process)
    try:
        a, b = (_Remote(f"http://127.0.0.1:{port}") for port in ports)
        for proxy in (a, b):
            await _until_answering(reactor, proxy)
        node = devnode_factory()
        added = None
        for _ in range(100):  # admin writes are refused (503) until the process is in step with etcd
            added = (await call(a, "POST", "/_admin/nodes", {"name": "gpu-a", "baseURL": node.url}))[0]
            if added.code != 503:
                break
            await sleep(reactor, 0.1)
        assert added.code == 200
        for _ in range(int(PROPAGATION / 0.05)):
            if await routed_to(b, "gpu-a"):
                break
            await sleep(reactor, 0.05)
        assert await routed_to(b, "gpu-a")
    finally:
        for transport, process in zip(transports, processes):
            if not process.ended.called:
                transport.signalProcess(signal.SIGTERM)
        for process in processes:
            await process.ended.addTimeout(WAIT, reactor)
    for process in processes:
        assert b"Traceback" not in process.output, process.output.decode(errors="replace")
        assert b"fleet in step with etcd" in process.output


class _Remote:
    def __init__(self, url):
        self.url = url


async def _until_answering(reactor, proxy):
    for _ in range(300):
        try:
            response = await treq.get(proxy.url + "/health", timeout=5)
            await response.content()
            return
        except ConnectionRefusedError:
            await sleep(reactor, 0.1)
    raise AssertionError(f"{proxy.url} never answered")

