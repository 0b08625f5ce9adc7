"""Load-aware and cache-aware routing over real sockets, with simulated vLLM and SGLang GPUs."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from blyanproxy.core.healthstate import UP

from .rawhttp import eventually

SYSTEM = " ".join(f"rule{i}" for i in range(300))


def chat(system: str, question: str) -> bytes:
    return json.dumps({"model": "sim", "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": question}]}).encode()


async def post(proxy, body: bytes):
    response = await treq.post(proxy.url + "/v1/chat/completions", data=body, timeout=10,
                               headers={"Content-Type": "application/json"})
    await response.content()
    return response


async def fleet(reactor, devnode_factory, proxy_factory, policy: str, engines=("vllm", "sglang"), **node):
    nodes = [devnode_factory(engine=engine, models=("sim",), **node) for engine in engines]
    proxy = await proxy_factory([n.url for n in nodes], health_checks=True, health_interval=0.1,
                                load_interval=0.05, selection_policy=policy)
    proxy.parts.load.startService()
    registry = proxy.registry
    await eventually(reactor, lambda: all(registry.stats(n.id).health.state == UP and registry.stats(n.id).load
                                          for n in registry.nodes()))
    return nodes, proxy


async def stop_reading(proxy) -> None:
    if proxy.parts.load.running:
        await proxy.parts.load.stopService()


@pytest_twisted.ensureDeferred
async def test_the_figures_of_vllm_and_sglang_nodes_are_read_and_shown(reactor, devnode_factory, proxy_factory):
    nodes, proxy = await fleet(reactor, devnode_factory, proxy_factory, "least-load")
    try:
        nodes[1].node.gpu.running = 3  # the SGLang node is busy with work from elsewhere
        registry = proxy.registry
        second = registry.nodes()[1]
        await eventually(reactor, lambda: (registry.stats(second.id).load.running or 0) == 3)
        response = await treq.get(proxy.url + "/metrics", timeout=5)
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        running = {s.labels["node"]: s.value for s in families["blyan_node_engine_running"].samples}
        assert running == {"node0": 0.0, "node1": 3.0}
        assert {s.labels["node"] for s in families["blyan_node_load_age_seconds"].samples} == {"node0", "node1"}
        for _ in range(4):  # least-load: the idle vLLM node takes them, one after another
            response = await post(proxy, chat("be brief", "hi"))
            assert response.code == 200 and response.headers.getRawHeaders("X-Blyan-Node") == ["node0"]
        nodes[1].node.gpu.running = 0
    finally:
        await stop_reading(proxy)


@pytest_twisted.ensureDeferred
async def test_a_queue_on_one_engine_sends_new_requests_elsewhere(reactor, devnode_factory, proxy_factory):
    nodes, proxy = await fleet(reactor, devnode_factory, proxy_factory, "least-load", engines=("sglang", "vllm"),
                               max_num_seqs=1, tokens_per_second=5, max_tokens=50)
    try:
        # a client that does not pass through the proxy fills the SGLang node and queues behind it
        direct = [treq.post(nodes[0].url + "/v1/chat/completions", data=chat("x", str(i)), timeout=30,
                            headers={"Content-Type": "application/json"}) for i in range(3)]
        registry = proxy.registry
        first = registry.nodes()[0]
        await eventually(reactor, lambda: (registry.stats(first.id).load.waiting or 0) >= 2)
        response = await post(proxy, json.dumps({"model": "sim", "max_tokens": 1,
                                                  "messages": [{"role": "user", "content": "hi"}]}).encode())
        assert response.code == 200 and response.headers.getRawHeaders("X-Blyan-Node") == ["node1"]
        for waiting in direct:
            waiting.cancel()
    finally:
        await stop_reading(proxy)


@pytest_twisted.ensureDeferred
async def test_cache_aware_keeps_a_system_prompt_on_one_node_and_its_cache_warm(reactor, devnode_factory,
                                                                                  proxy_factory):
    nodes, proxy = await fleet(reactor, devnode_factory, proxy_factory, "cache-aware",
                               engines=("vllm", "vllm", "sglang"), max_tokens=2, tokens_per_second=1000)
    try:
        homes = set()
        for question in ("one", "two", "three", "four", "five"):
            response = await post(proxy, chat(SYSTEM, question))
            assert response.code == 200
            homes.update(response.headers.getRawHeaders("X-Blyan-Node"))
        assert len(homes) == 1
        home = nodes[int(homes.pop()[-1])].node
        assert home.gpu.cached_tokens >= 4 * 288  # every later request found the system prompt's blocks
    finally:
        await stop_reading(proxy)
