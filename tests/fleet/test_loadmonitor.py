"""The LoadMonitor reads each node's figures its engine's way; the Balancer uses them while fresh."""

from __future__ import annotations

from attrs import evolve
from treq.testing import StubTreq
from twisted.internet.task import Clock

from blyanproxy.core import HealthRules, LoadFigures, Node, NodeRegistry, parse_route
from blyanproxy.devnode import DevNode, DevNodeConfig
from blyanproxy.fleet import Balancer, LoadMonitor

NONE: frozenset[str] = frozenset()


def simulated(engine: str) -> DevNode:
    return DevNode(DevNodeConfig(engine=engine, models=("m",)), Clock())


def registry_of(*engines: str) -> NodeRegistry:
    registry = NodeRegistry()
    for index, engine in enumerate(engines):
        registry.add(Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000",
                          engine=engine))
    return registry


def test_each_engine_is_read_from_its_own_source():
    clock = Clock()
    for engine in ("vllm", "sglang", "llamacpp", "tgi", "ollama"):
        node = simulated(engine)
        node.gpu.running = 2  # two generations under way
        registry = registry_of(engine)
        monitor = LoadMonitor(registry, StubTreq(node.resource()), clock, 1.0, 0.5)
        monitor.read_now()
        load = registry.stats("n0").load
        assert load is not None, engine
        assert load.running == (1.0 if engine == "ollama" else 2.0), engine  # Ollama: models in memory


def test_a_node_that_does_not_answer_keeps_the_loop_going_and_its_figures_go_stale():
    clock = Clock()
    node = simulated("vllm")
    registry = registry_of("vllm", "blyan")
    monitor = LoadMonitor(registry, StubTreq(node.resource()), clock, 1.0, 0.5)
    monitor.startService()
    assert registry.stats("n0").load is not None and registry.stats("n1").load is None  # blyan: no source
    node.configure(engine="blyan")  # /metrics now answers 404
    clock.advance(1.0)
    clock.advance(1.0)
    assert monitor.running and registry.stats("n0").load.at == 0.0
    monitor.stopService()


def test_a_scrape_resets_the_dispatches_and_the_balancer_prefers_the_idle_engine():
    clock = Clock()
    registry = registry_of("vllm", "vllm")
    balancer = Balancer(registry, clock, "least-load", HealthRules())
    registry.stats("n0").load = LoadFigures(waiting=4.0, running=8.0, at=0.0)
    registry.stats("n1").load = LoadFigures(waiting=0.0, running=1.0, at=0.0)
    lease = balancer.acquire(parse_route(b"/v1/chat/completions"), NONE)
    assert lease is not None and lease.node.id == "n1" and registry.stats("n1").dispatched_since_read == 1
    node = simulated("vllm")
    LoadMonitor(registry, StubTreq(node.resource()), clock, 1.0, 0.5).read_now()
    assert registry.stats("n1").dispatched_since_read == 0 and registry.stats("n1").in_flight == 1
    lease.release()
    assert registry.stats("n1").dispatched_since_read == -1  # ended since the read: one fewer running


def test_figures_older_than_three_intervals_count_as_unknown():
    clock = Clock()
    registry = registry_of("vllm", "vllm")
    balancer = Balancer(registry, clock, "least-load", HealthRules())
    balancer.load_interval = 1.0
    registry.stats("n0").load = LoadFigures(waiting=9.0, running=9.0, at=0.0)  # busy, says its engine
    registry.stats("n1").in_flight = 2  # ours, two in flight
    assert balancer.acquire(parse_route(b"/"), NONE).node.id == "n1"
    registry.stats("n1").in_flight = 2
    clock.advance(3.5)  # n0's figures are stale: it ranks by its in-flight count (0)
    assert balancer.acquire(parse_route(b"/"), NONE).node.id == "n0"


def test_cache_aware_sends_one_prompt_to_one_node():
    clock = Clock()
    registry = registry_of("vllm", "vllm", "vllm")
    balancer = Balancer(registry, clock, "cache-aware", HealthRules())
    keyed = evolve(parse_route(b"/v1/chat/completions"), body=b'{"messages":[{"role":"user","content":"one prompt"}]}')
    chosen = set()
    for _ in range(6):
        lease = balancer.acquire(keyed, NONE)
        chosen.add(lease.node.id)
        lease.release()
    assert len(chosen) == 1
