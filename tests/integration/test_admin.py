"""The admin API and the public status endpoints over real sockets."""

import json
import os

import pytest
import pytest_twisted
import treq

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"X-Admin-Token": TOKEN}


async def call(proxy, method, path, body=None, headers=AUTH, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    response = await treq.request(method, proxy.url + path, data=data, headers=headers, timeout=10)
    text = await response.content()
    return response, (json.loads(text) if text else None)


@pytest.fixture
def admin_proxy(proxy_factory, tmp_path):
    async def start(node_urls=(), **overrides):
        return await proxy_factory(node_urls, persist=True, admin_token=TOKEN,
                                   state_file=str(tmp_path / "state.json"), **overrides)
    return start


@pytest_twisted.ensureDeferred
async def test_auth(admin_proxy):
    proxy = await admin_proxy()
    assert (await call(proxy, "GET", "/_admin/status", headers={}))[0].code == 401
    wrong, body = await call(proxy, "GET", "/_admin/status", headers={"X-Admin-Token": "nope"})
    assert (wrong.code, body["code"]) == (401, "unauthorized")
    query, body = await call(proxy, "GET", f"/_admin/status?token={TOKEN}", headers={})
    assert (query.code, body["code"]) == (400, "token_in_query")
    assert (await call(proxy, "GET", "/_admin/status"))[0].code == 200
    bearer = await call(proxy, "GET", "/_admin/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer[0].code == 200


@pytest_twisted.ensureDeferred
async def test_repeated_failures_are_refused_for_a_while(admin_proxy):
    proxy = await admin_proxy()
    for _ in range(10):
        await call(proxy, "GET", "/_admin/status", headers={"X-Admin-Token": "guess"})
    refused, body = await call(proxy, "GET", "/_admin/status")  # even the right token, for now
    assert (refused.code, body["code"]) == (429, "too_many_failures")
    assert int(refused.headers.getRawHeaders("Retry-After")[0]) > 0


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_forwarder_one_clients_failures_lock_out_only_that_client(admin_proxy):
    from blyanproxy.core import parse_forward_trust

    proxy = await admin_proxy(trust_forwarded=parse_forward_trust("127.0.0.1"))
    for _ in range(10):
        await call(proxy, "GET", "/_admin/status", headers={"X-Admin-Token": "guess", "X-Forwarded-For": "6.6.6.6"})
    refused, body = await call(proxy, "GET", "/_admin/status", headers={"X-Admin-Token": TOKEN,
                                                                        "X-Forwarded-For": "6.6.6.6"})
    assert (refused.code, body["code"]) == (429, "too_many_failures")
    assert 0 < int(refused.headers.getRawHeaders("Retry-After")[0]) <= 60
    admin, _ = await call(proxy, "GET", "/_admin/status", headers={"X-Admin-Token": TOKEN,
                                                                   "X-Forwarded-For": "10.1.1.1"})
    assert admin.code == 200


@pytest_twisted.ensureDeferred
async def test_node_lifecycle_and_persistence(admin_proxy, devnode_factory, tmp_path):
    node = devnode_factory()
    proxy = await admin_proxy()
    added, body = await call(proxy, "POST", "/_admin/nodes",
                             {"name": "gpu-a", "baseURL": node.url, "tags": ["a100"], "metadata": {"gpu": "A100"}})
    assert added.code == 200 and body["success"] is True
    node_id = body["node"]["id"]
    assert body["node"]["baseURL"] == node.url and body["node"]["tags"] == ["a100"]
    saved = json.loads((tmp_path / "state.json").read_text())
    assert [n["id"] for n in saved["nodes"]] == [node_id]  # persisted before the answer
    forwarded = await treq.get(proxy.url + "/v1/models", timeout=5)
    assert forwarded.code == 200 and forwarded.headers.getRawHeaders("X-Blyan-Node") == ["gpu-a"]
    await forwarded.content()
    listed = (await call(proxy, "GET", "/_admin/nodes"))[1]["nodes"]
    assert [n["id"] for n in listed] == [node_id] and listed[0]["requests"] == 1
    changed = (await call(proxy, "PATCH", f"/_admin/nodes/{node_id}", {"name": "gpu-b", "weight": 3}))[1]
    assert (changed["node"]["name"], changed["node"]["weight"]) == ("gpu-b", 3)
    assert (await call(proxy, "GET", f"/_admin/nodes/{node_id}"))[1]["node"]["name"] == "gpu-b"
    drained = (await call(proxy, "POST", f"/_admin/nodes/{node_id}/drain"))[1]
    assert drained["node"]["draining"] is True
    assert (await treq.get(proxy.url + "/v1/models", timeout=5)).code == 503
    assert (await call(proxy, "POST", "/_admin/active/0"))[1] == {"success": True, "activeIndex": 0,
                                                                   "activeId": node_id}
    assert (await call(proxy, "PUT", "/_admin/policy", {"policy": "round-robin"}))[1]["policy"] == "round-robin"
    assert (await call(proxy, "GET", "/_admin/policy"))[1] == {"policy": "round-robin"}
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["policy"] == "round-robin" and saved["activeId"] == node_id
    assert saved["nodes"][0]["draining"] is True and saved["nodes"][0]["name"] == "gpu-b"
    removed, body = await call(proxy, "DELETE", f"/_admin/nodes/{node_id}")
    assert (removed.code, body) == (200, {"success": True})
    assert json.loads((tmp_path / "state.json").read_text())["nodes"] == []


@pytest_twisted.ensureDeferred
async def test_status_and_forced_health_check(admin_proxy, devnode_factory):
    node = devnode_factory()
    proxy = await admin_proxy([node.url])
    checked, body = await call(proxy, "POST", "/_admin/health-check")
    assert checked.code == 200 and body["nodes"][0]["state"] == "up"
    status = (await call(proxy, "GET", "/_admin/status"))[1]
    assert status["policy"] == "active-first" and len(status["nodes"]) == 1
    assert set(status["metrics"]) == {"totalRequests", "failedRequests", "nodeStats"}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "method, path, body, raw, status, fragment",
    [
        ("POST", "/_admin/nodes", None, b"{nope", 400, "not valid JSON"),
        ("POST", "/_admin/nodes", None, b"name=x", 400, "not valid JSON"),
        ("POST", "/_admin/nodes", [1, 2], None, 400, "must be a JSON object"),
        ("POST", "/_admin/nodes", {"baseURL": "http://10.9.9.9:1"}, None, 400, "name: missing"),
        ("POST", "/_admin/nodes", {"name": "x"}, None, 400, "baseURL: missing"),
        ("POST", "/_admin/nodes", {"name": 3, "baseURL": "http://10.9.9.9:1"}, None, 400, "name:"),
        ("POST", "/_admin/nodes", {"name": "x", "baseURL": "ftp://h"}, None, 400, "baseURL: must start with"),
        ("POST", "/_admin/nodes", {"name": "x", "baseURL": "http://u:p@h"}, None, 400, "credentials"),
        ("POST", "/_admin/nodes", {"name": "x", "baseURL": "http://h:1", "colour": 1}, None, 400, "colour: unknown"),
        ("POST", "/_admin/nodes", {"name": "x", "baseURL": "http://h:1", "weight": "3"}, None, 400, "weight:"),
        ("POST", "/_admin/nodes", {"name": "x", "baseURL": "http://h:1", "tags": "a"}, None, 400, "tags:"),
        ("POST", "/_admin/nodes", {"name": "x\r\nX: y", "baseURL": "http://h:1"}, None, 400, "name:"),
        ("POST", "/_admin/nodes", None, b"[" + b"1," * 40000 + b"1]", 413, "exceeds"),
        ("GET", "/_admin/nodes/nosuch", None, None, 404, "Node not found"),
        ("PATCH", "/_admin/nodes/nosuch", {"name": "x"}, None, 404, "Node not found"),
        ("DELETE", "/_admin/nodes/nosuch", None, None, 404, "Node not found"),
        ("POST", "/_admin/active/01", None, None, 400, "index:"),
        ("POST", "/_admin/active/-1", None, None, 400, "index:"),
        ("POST", "/_admin/active/5", None, None, 400, "index:"),
        ("PUT", "/_admin/active", {"id": "nosuch"}, None, 404, "Node not found"),
        ("PUT", "/_admin/policy", {"policy": "fastest"}, None, 400, "policy:"),
        ("GET", "/_admin/nosuch", None, None, 404, "no such admin route"),
    ],
)
async def test_refusals_change_nothing(admin_proxy, tmp_path, method, path, body, raw, status, fragment):
    proxy = await admin_proxy(["http://10.9.9.9:1"])
    before = (tmp_path / "state.json").read_bytes()
    response, answer = await call(proxy, method, path, body, raw=raw)
    assert response.code == status
    assert fragment in answer["error"] and answer["code"]
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert (tmp_path / "state.json").read_bytes() == before


@pytest_twisted.ensureDeferred
async def test_duplicates_are_409_and_wrong_methods_405_with_allow(admin_proxy):
    proxy = await admin_proxy(["http://10.9.9.9:1"])
    duplicate, body = await call(proxy, "POST", "/_admin/nodes", {"name": "again", "baseURL": "http://10.9.9.9:1/"})
    assert (duplicate.code, body["code"]) == (409, "duplicate_node")
    wrong, body = await call(proxy, "DELETE", "/_admin/status")
    assert (wrong.code, body["code"]) == (405, "method_not_allowed")
    assert "GET" in wrong.headers.getRawHeaders("Allow")[0]


@pytest_twisted.ensureDeferred
async def test_public_health_and_status(proxy_factory, devnode_factory):
    node = devnode_factory()
    proxy = await proxy_factory([node.url, "http://10.9.9.9:1"])
    proxy.registry.update(proxy.registry.nodes()[1].id, draining=True)
    health, body = await call(proxy, "GET", "/health", headers={})
    assert health.code == 200
    assert body["status"] == "healthy" and body["nodes"] == 2 and body["healthyNodes"] == 1
    assert set(body) == {"status", "nodes", "healthyNodes", "uptime"}
    await treq.get(proxy.url + "/v1/models", timeout=5)
    status = (await call(proxy, "GET", "/_status", headers={}))[1]
    assert status == {"healthy": 1, "total": 2, "policy": "active-first",
                      "metrics": {"requests": 1, "failures": 0}}
    proxy.registry.update(proxy.registry.nodes()[0].id, draining=True)
    degraded, body = await call(proxy, "GET", "/health", headers={})
    assert (degraded.code, body["status"]) == (503, "degraded")
    posted, _ = await call(proxy, "POST", "/health", headers={})
    assert posted.code == 405


def test_generated_token_file_is_private_and_reused(tmp_path):
    from blyanproxy.admin.auth import load_or_create_token

    state = str(tmp_path / "data" / "state.json")
    token = load_or_create_token(None, None, state)
    path = tmp_path / "data" / "admin_token"
    assert path.read_text().strip() == token and len(token) >= 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_token(None, None, state) == token
    assert load_or_create_token("explicit-token-0123456789", None, state) == "explicit-token-0123456789"


@pytest_twisted.ensureDeferred
async def test_many_concurrent_changes_leave_registry_and_file_consistent(admin_proxy, tmp_path):
    from twisted.internet.defer import ensureDeferred, gatherResults

    proxy = await admin_proxy()
    adds = [call(proxy, "POST", "/_admin/nodes", {"name": f"n{i}", "baseURL": f"http://10.8.0.{i}:1"})
            for i in range(40)]
    results = await gatherResults([ensureDeferred(a) for a in adds])
    ids = [body["node"]["id"] for _, body in results]
    deletes = [call(proxy, "DELETE", f"/_admin/nodes/{node_id}") for node_id in ids[::2]]
    await gatherResults([ensureDeferred(d) for d in deletes])
    in_memory = [n.id for n in proxy.registry.nodes()]
    on_disk = [n["id"] for n in json.loads((tmp_path / "state.json").read_text())["nodes"]]
    assert in_memory == on_disk
    assert sorted(in_memory) == sorted(ids[1::2])


@pytest_twisted.ensureDeferred
async def test_the_token_never_reaches_the_log(admin_proxy):
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proxy = await admin_proxy()
        await call(proxy, "GET", "/_admin/status")
        await call(proxy, "GET", "/_admin/status", headers={"X-Admin-Token": TOKEN + "x"})
        await call(proxy, "GET", f"/_admin/status?token={TOKEN}", headers={})
        await call(proxy, "POST", "/_admin/nodes", {"name": "n", "baseURL": "http://10.7.0.1:1"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "refused" in text
    assert TOKEN not in text


@pytest_twisted.ensureDeferred
async def test_admin_changes_survive_a_restart(proxy_factory, tmp_path):
    state = str(tmp_path / "state.json")
    first = await proxy_factory(["http://10.9.9.1:1"], persist=True, admin_token=TOKEN, state_file=state)
    added = (await call(first, "POST", "/_admin/nodes", {"name": "extra", "baseURL": "http://10.9.9.2:1"}))[1]
    await call(first, "PUT", "/_admin/active", {"id": added["node"]["id"]})
    await call(first, "PUT", "/_admin/policy", {"policy": "least-latency"})
    await call(first, "POST", f"/_admin/nodes/{added['node']['id']}/drain")
    await first.stop()
    second = await proxy_factory(["http://10.9.9.1:1"], persist=True, admin_token=TOKEN, state_file=state)
    status = (await call(second, "GET", "/_admin/status"))[1]
    assert [n["name"] for n in status["nodes"]] == ["node0", "extra"]
    assert status["activeId"] == added["node"]["id"] and status["policy"] == "least-latency"
    assert status["nodes"][1]["draining"] is True


@pytest_twisted.ensureDeferred
async def test_the_bare_prefix_is_answered_by_the_admin_api_not_forwarded(admin_proxy, devnode_factory):
    node = devnode_factory()
    proxy = await admin_proxy([node.url])
    for path in ("/_admin", "/_admin/", "/_admin/nodes/x/y/z"):
        response, body = await call(proxy, "GET", path)
        assert response.code == 404 and body["code"] == "not_found", path
    assert node.node.stats.requests == 0
