"""Engines and models over real sockets: detection, model routing, the proxy's own model lists,
the loading state and Ollama's paths (simulated nodes of each engine)."""

import json

import pytest_twisted
import treq

from blyanproxy.core.healthstate import LOADING, UP

from .rawhttp import eventually


def chat(model):
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": model}).encode()


async def post(proxy, path, body):
    response = await treq.post(proxy.url + path, data=body, headers={"Content-Type": "application/json"},
                               timeout=5)
    return response, await response.json()


async def get(proxy, path):
    response = await treq.get(proxy.url + path, timeout=5)
    return response, await response.json()


async def mixed_fleet(reactor, devnode_factory, proxy_factory, **settings):
    """A vLLM node serving chat-a and chat-shared, a llama.cpp node serving chat-b and chat-shared, all up."""
    vllm = devnode_factory(engine="vllm", models=("chat-a", "chat-shared"))
    llama = devnode_factory(engine="llamacpp", models=("chat-b", "chat-shared"))
    proxy = await proxy_factory([vllm.url, llama.url], health_checks=True, health_interval=0.1, **settings)
    registry = proxy.registry
    await eventually(reactor, lambda: all(registry.stats(n.id).health.state == UP and registry.stats(n.id).models
                                          for n in registry.nodes()))
    return vllm, llama, proxy


@pytest_twisted.ensureDeferred
async def test_engines_are_detected_and_a_model_goes_only_to_its_nodes(reactor, devnode_factory, proxy_factory):
    vllm, llama, proxy = await mixed_fleet(reactor, devnode_factory, proxy_factory, selection_policy="round-robin")
    assert [proxy.registry.stats(n.id).engine for n in proxy.registry.nodes()] == ["vllm", "llamacpp"]
    for model, node in (("chat-a", "node0"), ("chat-b", "node1")) * 3:
        response, body = await post(proxy, "/v1/chat/completions", chat(model))
        assert response.code == 200 and body["model"] == model
        assert response.headers.getRawHeaders("X-Blyan-Node") == [node]
    shared = set()
    for _ in range(4):
        response, _ = await post(proxy, "/v1/chat/completions", chat("chat-shared"))
        shared.update(response.headers.getRawHeaders("X-Blyan-Node"))
    assert shared == {"node0", "node1"}  # the policy chooses among the nodes serving the model


@pytest_twisted.ensureDeferred
async def test_the_proxy_answers_the_model_list(reactor, devnode_factory, proxy_factory):
    _, _, proxy = await mixed_fleet(reactor, devnode_factory, proxy_factory)
    response, listing = await get(proxy, "/v1/models")
    assert response.code == 200 and response.headers.getRawHeaders("X-Blyan-Node") is None
    assert [(m["id"], m["owned_by"]) for m in listing["data"]] == [
        ("chat-a", "vllm"), ("chat-shared", "vllm"), ("chat-b", "llamacpp")]
    response, model = await get(proxy, "/v1/models/chat-b")
    assert (response.code, model["id"], model["object"]) == (200, "chat-b", "model")
    response, error = await get(proxy, "/v1/models/nope")
    assert response.code == 404 and "nope" in json.dumps(error)
    response, _ = await get(proxy, "/tags/all/v1/models")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_unknown_and_unavailable_models(reactor, devnode_factory, proxy_factory):
    vllm, _, proxy = await mixed_fleet(reactor, devnode_factory, proxy_factory)
    response, error = await post(proxy, "/v1/chat/completions", chat("no-such-model"))
    assert response.code == 404 and error["error"]["code"] == "model_not_found"
    assert "no-such-model" in error["error"]["message"]
    await vllm.stop()  # chat-a is served only by a node that is now down
    vllm_node = proxy.registry.nodes()[0]
    await eventually(reactor, lambda: proxy.registry.stats(vllm_node.id).health.state == "down")
    response, error = await post(proxy, "/v1/chat/completions", chat("chat-a"))
    assert response.code == 503 and response.headers.getRawHeaders("Retry-After")
    _, listing = await get(proxy, "/v1/models")
    assert [m["id"] for m in listing["data"]] == ["chat-b", "chat-shared"]  # only models with a usable node


@pytest_twisted.ensureDeferred
async def test_a_loading_node_is_loading_then_up(reactor, devnode_factory, proxy_factory):
    loading = devnode_factory(engine="llamacpp", loading_ms=600, models=("late",))
    proxy = await proxy_factory([loading.url], health_checks=True, health_interval=0.1)
    stats = proxy.registry.stats(proxy.registry.nodes()[0].id)
    await eventually(reactor, lambda: stats.health.state == LOADING)
    response, _ = await post(proxy, "/v1/chat/completions", chat("late"))
    assert response.code == 503
    assert stats.health.ejections == 0
    await eventually(reactor, lambda: stats.health.state == UP and stats.models == ("late",), timeout=5)
    response, _ = await post(proxy, "/v1/chat/completions", chat("late"))
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_ollama_paths_reach_ollama_untouched_and_blyan_nodes_without_api(
    reactor, devnode_factory, proxy_factory
):
    ollama = devnode_factory(engine="ollama", models=("llama3:latest",))
    blyan = devnode_factory(models=("blyan-sim-7b",))
    proxy = await proxy_factory([ollama.url, blyan.url], health_checks=True, health_interval=0.1)
    registry = proxy.registry
    await eventually(reactor, lambda: [registry.stats(n.id).engine for n in registry.nodes()] == ["ollama", "blyan"])
    await eventually(reactor, lambda: all(registry.stats(n.id).health.state == UP for n in registry.nodes()))
    response, tags = await get(proxy, "/api/tags")
    assert response.code == 200 and [m["name"] for m in tags["models"]] == ["llama3:latest", "blyan-sim-7b"]
    body = json.dumps({"model": "llama3:latest", "prompt": "hi", "stream": False}).encode()
    response, answer = await post(proxy, "/api/generate", body)
    assert response.code == 200 and answer["done"] is True
    assert ollama.node.stats.by_path.get("/api/generate") == 1 and "/generate" not in ollama.node.stats.by_path
    response = await treq.get(proxy.url + "/api/_devnode/echo?api=node1", timeout=5)
    assert response.code == 200
    assert (await response.json())["uri"] == "/_devnode/echo"  # /api removed for a Blyan-style node
