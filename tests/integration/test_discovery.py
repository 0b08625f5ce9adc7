"""Per-API-key workload discovery over real sockets: a fake workloads API, simulated nodes, the proxy."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from blyanproxy.discovery import parse_node_allow

from . import fakeworkloads
from .fakeworkloads import workload
from .rawhttp import error_code, eventually, sleep

KEY = "c3-key-0123456789abcdef"
OTHER_KEY = "c3-key-fedcba9876543210"


def hostport(devnode) -> str:
    return f"127.0.0.1:{devnode.port}"


async def discovery_proxy(proxy_factory, api, nodes=(), **settings):
    settings.setdefault("workloads_node_scheme", "http")
    settings.setdefault("workloads_node_allow", parse_node_allow("127.0.0.1/32"))  # the devnodes' address
    return await proxy_factory(list(nodes), api_url=api.url, **settings)


async def get(proxy, path, key=KEY, bearer=False, headers=None, **kwargs):
    headers = dict(headers or {})
    if key is not None:
        headers.update({"Authorization": f"Bearer {key}"} if bearer else {"X-C3-API-KEY": key})
    response = await treq.get(proxy.url + path, headers=headers, timeout=10, **kwargs)
    body = await response.content()
    return response, body


def echoed(body: bytes) -> dict:
    record = json.loads(body)
    record["headers"] = {name.lower(): value for name, value in record["headers"]}
    return record


@pytest_twisted.ensureDeferred
async def test_a_key_routes_to_its_workloads_and_reaches_the_node_unchanged(
        reactor, devnode_factory, proxy_factory, workloads_api):
    node = devnode_factory(name="gpu-a")
    workloads_api.set(KEY, [workload(hostport(node))])
    proxy = await discovery_proxy(proxy_factory, workloads_api)

    response, body = await get(proxy, "/_devnode/echo/x?q=1")
    assert response.code == 200
    record = echoed(body)
    assert record["uri"] == "/_devnode/echo/x?q=1"
    assert record["headers"]["x-c3-api-key"] == KEY
    response, body = await get(proxy, "/_devnode/echo", bearer=True)
    assert response.code == 200 and echoed(body)["headers"]["authorization"] == f"Bearer {KEY}"
    assert response.headers.getRawHeaders("X-Blyan-Node") == [hostport(node)]
    assert workloads_api.calls == [KEY]  # one call, then the cache
    assert json.loads(workloads_api.bodies[0]) == {"running": True}


@pytest_twisted.ensureDeferred
async def test_tag_and_index_routes_inside_a_key(reactor, devnode_factory, proxy_factory, workloads_api):
    a, b, c = (devnode_factory(name=n) for n in "abc")
    workloads_api.set(KEY, [
        workload(hostport(a), tags=["small"]),
        workload(hostport(c), tags=["large"], running=False, status="stopped"),
        workload(hostport(b), tags=["large", "eu"]),
    ])
    proxy = await discovery_proxy(proxy_factory, workloads_api)

    async def served(path):
        response, body = await get(proxy, path)
        return response.code, response.headers.getRawHeaders("X-Blyan-Node", [None])[0], body

    code, node, body = await served("/tags/large/_devnode/echo/y?z=2")
    assert (code, node, echoed(body)["uri"]) == (200, hostport(b), "/_devnode/echo/y?z=2")
    assert {(await served("/tags/all/v1/models"))[1] for _ in range(4)} == {hostport(a), hostport(b)}
    assert (await served("/0/v1/models"))[:2] == (200, hostport(a))
    assert (await served("/1/v1/models"))[:2] == (200, hostport(b))  # the stopped workload is not counted
    for path, status, code in [
        ("/2/v1/models", 404, "index_out_of_range"),
        ("/tags/LARGE/v1/models", 404, "unknown_tag"),
        ("/tags/", 400, "missing_tag"),
        ("/-1/x", 400, "bad_index"),
    ]:
        answered, _, text = await served(path)
        assert (answered, error_code(json.loads(text))) == (status, code), path
    assert c.node.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_errors_without_a_key_with_a_refused_key_and_with_no_running_workload(
        reactor, devnode_factory, proxy_factory, workloads_api):
    workloads_api.set(KEY, [workload("127.0.0.1:9", running=False, status="stopped")])
    proxy = await discovery_proxy(proxy_factory, workloads_api)

    response, body = await get(proxy, "/v1/models", key=None)
    assert response.code == 401 and error_code(json.loads(body)) == "missing_api_key"
    for _ in range(5):
        response, body = await get(proxy, "/v1/models", key="unknown-key-123")
        assert response.code == 401 and error_code(json.loads(body)) == "api_key_rejected"
        response, body = await get(proxy, "/v1/models")
        assert response.code == 404 and error_code(json.loads(body)) == "no_workloads"
    # Refusals and empty answers are remembered: no API storm from unknown or idle keys.
    assert workloads_api.calls_for("unknown-key-123") == 1
    assert workloads_api.calls_for(KEY) == 1


@pytest_twisted.ensureDeferred
async def test_workloads_and_the_liveness_answer(reactor, devnode_factory, proxy_factory, workloads_api):
    listed = [workload("10.0.0.1:443", tags=["x"]), workload("10.0.0.2", running=False, status="stopped")]
    workloads_api.set(KEY, listed)
    proxy = await discovery_proxy(proxy_factory, workloads_api)

    response, body = await get(proxy, "/workloads")
    assert response.code == 200 and json.loads(body) == listed
    response, body = await get(proxy, "/workloads", key=None)
    assert response.code == 401
    response, body = await get(proxy, "/", key=None)
    assert response.code == 200 and json.loads(body)["status"] == "healthy"
    assert workloads_api.calls == [KEY]


@pytest_twisted.ensureDeferred
async def test_one_api_call_for_a_hundred_concurrent_first_requests(
        reactor, devnode_factory, proxy_factory, workloads_api):
    node = devnode_factory(name="gpu")
    workloads_api.set(KEY, [workload(hostport(node))])
    workloads_api.mode = fakeworkloads.HANG
    proxy = await discovery_proxy(proxy_factory, workloads_api)

    requests = [defer.ensureDeferred(get(proxy, "/v1/models")) for _ in range(100)]
    await eventually(reactor, lambda: len(workloads_api.hung) == 1)
    await sleep(reactor, 0.2)
    assert len(workloads_api.calls) == 1
    hung = workloads_api.hung.pop()
    hung.write(json.dumps(workloads_api.answers[KEY]).encode())
    hung.finish()
    results = await defer.gatherResults(requests)
    assert [response.code for response, _ in results] == [200] * 100
    assert workloads_api.calls == [KEY]
    assert node.node.stats.requests == 100


@pytest_twisted.ensureDeferred
async def test_stale_list_served_while_the_api_is_down_then_garbage_and_hangs_fail_cleanly(
        reactor, devnode_factory, proxy_factory, workloads_api):
    node = devnode_factory(name="gpu")
    workloads_api.set(KEY, [workload(hostport(node))])
    proxy = await discovery_proxy(proxy_factory, workloads_api, workloads_refresh=0.05, workloads_timeout=0.3)
    assert (await get(proxy, "/v1/models"))[0].code == 200

    workloads_api.mode = fakeworkloads.FAIL
    calls = len(workloads_api.calls)
    await eventually(reactor, lambda: len(workloads_api.calls) >= calls + 2)  # refreshes fail...
    assert (await get(proxy, "/v1/models"))[0].code == 200  # ...and the last good list is served

    for mode in (fakeworkloads.FAIL, fakeworkloads.GARBAGE, fakeworkloads.HANG):
        workloads_api.mode = mode
        response, body = await get(proxy, "/v1/models", key=f"new-key-{mode}")
        assert response.code == 502, mode
        assert error_code(json.loads(body)) == "workloads_unavailable"


@pytest_twisted.ensureDeferred
async def test_a_node_leaving_the_list_leaves_rotation_at_the_next_refresh(
        reactor, devnode_factory, proxy_factory, workloads_api):
    a, b = devnode_factory(name="a"), devnode_factory(name="b")
    workloads_api.set(KEY, [workload(hostport(a)), workload(hostport(b))])
    proxy = await discovery_proxy(proxy_factory, workloads_api, workloads_refresh=0.05)
    served = [(await get(proxy, "/v1/models"))[0].headers.getRawHeaders("X-Blyan-Node")[0] for _ in range(4)]
    assert set(served) == {hostport(a), hostport(b)}

    workloads_api.set(KEY, [workload(hostport(b))])
    calls = len(workloads_api.calls)
    await eventually(reactor, lambda: len(workloads_api.calls) >= calls + 1)
    await sleep(reactor, 0.05)
    before = a.node.stats.requests
    served = [(await get(proxy, "/v1/models"))[0].headers.getRawHeaders("X-Blyan-Node")[0] for _ in range(4)]
    assert served == [hostport(b)] * 4 and a.node.stats.requests == before


@pytest_twisted.ensureDeferred
async def test_least_in_flight_counts_a_nodes_load_from_every_key(
        reactor, devnode_factory, proxy_factory, workloads_api):
    a, b = devnode_factory(name="a", tokens_per_second=5), devnode_factory(name="b")
    workloads_api.set(KEY, [workload(hostport(a)), workload(hostport(b))])
    workloads_api.set(OTHER_KEY, [workload(hostport(a))])
    proxy = await discovery_proxy(proxy_factory, workloads_api)
    body = json.dumps({"model": "blyan-sim-7b", "stream": True, "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    # The other key holds a long stream on node a...
    held = await treq.post(proxy.url + "/v1/chat/completions", body, timeout=10,
                           headers={"X-C3-API-KEY": OTHER_KEY, "Content-Type": "application/json"})
    assert held.headers.getRawHeaders("X-Blyan-Node") == [hostport(a)]
    # ...so this key's requests go to b, though this key has nothing in flight on a.
    served = [(await get(proxy, "/v1/models"))[0].headers.getRawHeaders("X-Blyan-Node")[0] for _ in range(3)]
    assert served == [hostport(b)] * 3
    assert held.code == 200 and b"[DONE]" in await held.content()


@pytest_twisted.ensureDeferred
async def test_only_get_on_the_root_is_the_proxys_own(reactor, devnode_factory, proxy_factory, workloads_api):
    node = devnode_factory(name="gpu")
    workloads_api.set(KEY, [workload(hostport(node))])
    proxy = await discovery_proxy(proxy_factory, workloads_api)
    response = await treq.post(proxy.url + "/", b"{}", headers={"X-C3-API-KEY": KEY}, timeout=10)
    await response.content()
    assert response.headers.getRawHeaders("X-Blyan-Node") == [hostport(node)]
    assert node.node.stats.last_request.uri == b"/"


@pytest_twisted.ensureDeferred
async def test_keys_never_reach_the_log_or_the_metrics(reactor, devnode_factory, proxy_factory, workloads_api):
    node = devnode_factory(name="gpu")
    workloads_api.set(KEY, [workload(hostport(node))])
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proxy = await discovery_proxy(proxy_factory, workloads_api, log_level="DEBUG")
        await get(proxy, "/v1/models")
        await get(proxy, "/v1/models", key="secret-unknown-key-42")
        await get(proxy, "/0/v1/models", bearer=True)
        workloads_api.mode = fakeworkloads.FAIL
        await get(proxy, "/v1/models", key="secret-failing-key-43")
        metrics = (await get(proxy, "/metrics"))[1].decode()
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = "\n".join(formatEvent(event) + repr(event) for event in events)
    assert "workload(s)" in logged  # the discovery log lines are there, naming keys by hash
    for secret in (KEY, "secret-unknown-key-42", "secret-failing-key-43"):
        assert secret not in logged and secret not in metrics
    assert 'blyan_workloads_api_calls_total{outcome="ok"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_tag_and_index_routes_on_the_registry(reactor, devnode_factory, proxy_factory):
    a, b = devnode_factory(name="a"), devnode_factory(name="b")
    proxy = await proxy_factory([a.url, b.url])
    first, second = proxy.registry.nodes()
    proxy.registry.update(second.id, tags=("large",))

    response = await treq.get(proxy.url + "/tags/large/_devnode/echo/p", timeout=5)
    assert response.code == 200 and echoed(await response.content())["uri"] == "/_devnode/echo/p"
    assert response.headers.getRawHeaders("X-Blyan-Node") == ["node1"]
    response = await treq.get(proxy.url + "/0/v1/models", timeout=5)
    await response.content()
    assert response.headers.getRawHeaders("X-Blyan-Node") == ["node0"]
    response = await treq.get(proxy.url + "/tags/none/v1/models", timeout=5)
    assert response.code == 404 and error_code(json.loads(await response.content())) == "unknown_tag"
    # Without API_URL a bearer token is the node's business: no discovery.
    response = await treq.get(proxy.url + "/v1/models", headers={"Authorization": "Bearer sk-x"}, timeout=5)
    assert response.code == 200
    await response.content()


@pytest_twisted.ensureDeferred
async def test_a_websocket_with_a_key_goes_to_the_keys_tagged_node(
        reactor, devnode_factory, proxy_factory, workloads_api):
    from twisted.internet.threads import deferToThread
    from websockets.sync.client import connect

    a, b = devnode_factory(name="a"), devnode_factory(name="b")
    workloads_api.set(KEY, [workload(hostport(a)), workload(hostport(b), tags=["chat"])])
    proxy = await discovery_proxy(proxy_factory, workloads_api)

    def talk():
        url = proxy.url.replace("http://", "ws://") + "/tags/chat/ws/echo"
        with connect(url, proxy=None, additional_headers={"X-C3-API-KEY": KEY},
                     open_timeout=10, close_timeout=10) as websocket:
            websocket.send("hi")
            return websocket.recv(timeout=10)

    assert await deferToThread(talk) == "hi"
    assert b.node.stats.websocket_messages == 1 and a.node.stats.websocket_messages == 0
    # The key's request is over once the WebSocket closed: it may be forgotten when idle.
    record = await proxy.parts.directory.lookup(KEY.encode())
    await eventually(reactor, lambda: record.in_flight == 0)
    assert proxy.parts.directory.balancer.stats(proxy.parts.directory.pool(record).nodes[1]).in_flight == 0


@pytest_twisted.ensureDeferred
async def test_workloads_api_calls_write_no_factory_lines(reactor, devnode_factory, proxy_factory, workloads_api):
    node = devnode_factory(name="gpu-a")
    workloads_api.set(KEY, [workload(hostport(node))])
    workloads_api.set(OTHER_KEY, [workload(hostport(node))])
    proxy = await discovery_proxy(proxy_factory, workloads_api)
    lines = []
    observe = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observe)
    try:
        for key in (KEY, OTHER_KEY):
            response, _ = await get(proxy, "/v1/models", key=key)
            assert response.code == 200
        await proxy.parts.directory.stopService()  # closes the API connections
    finally:
        globalLogPublisher.removeObserver(observe)
    assert workloads_api.calls == [KEY, OTHER_KEY]
    api = workloads_api.url.split("/")[2]  # 127.0.0.1:port: the test's own client logs its factories
    assert [line for line in lines if "Starting factory" in line and "127.0.0.1:" in line]  # the check can see
    assert not [line for line in lines if "factory" in line and api in line], lines


@pytest_twisted.ensureDeferred
async def test_first_lookups_are_limited_per_forwarded_client_address(
        reactor, devnode_factory, proxy_factory, workloads_api):
    from blyanproxy.core import parse_forward_trust

    node = devnode_factory(name="gpu")
    workloads_api.set(KEY, [workload(hostport(node))])
    workloads_api.mode = fakeworkloads.HANG  # every first lookup stays under way
    proxy = await discovery_proxy(proxy_factory, workloads_api, trust_forwarded=parse_forward_trust("127.0.0.1"),
                                  workloads_lookups_per_client=2)

    def from_address(address, key, path="/v1/models"):
        return defer.ensureDeferred(get(proxy, path, key=key, headers={"X-Forwarded-For": address}))

    flooding = [from_address("6.6.6.6", f"random-{n}") for n in range(2)]
    await eventually(reactor, lambda: len(workloads_api.hung) == 2)
    for path in ("/v1/models", "/workloads"):
        response, body = await from_address("6.6.6.6", "random-more", path)
        assert response.code == 429 and error_code(json.loads(body)) == "too_many_new_keys", path
        assert response.headers.getRawHeaders("Retry-After") == ["1"]
    newcomer = from_address("7.7.7.7", KEY)
    await eventually(reactor, lambda: len(workloads_api.hung) == 3)
    assert sorted(workloads_api.calls[:2]) == ["random-0", "random-1"] and workloads_api.calls[2:] == [KEY]
    workloads_api.mode = fakeworkloads.ANSWER
    for hung in workloads_api.hung:
        key = hung.getHeader(b"x-c3-api-key").decode()
        if key == KEY:
            hung.write(json.dumps(workloads_api.answers[KEY]).encode())
        else:
            hung.setResponseCode(401)
        hung.finish()
    response, _ = await newcomer
    assert response.code == 200
    assert [response.code for response, _ in await defer.gatherResults(flooding)] == [401, 401]
