"""HealthMonitor and engines on a Clock: detection, each engine's probe, loading, models learned."""

import json

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from blyanproxy.core.healthstate import DOWN, LOADING, UP, HealthRules
from blyanproxy.core.nodes import Node, NodeRegistry
from blyanproxy.fleet.health import HealthMonitor
from tests.fleet.test_health import FakeResponse


def models_body(*models, owner):
    return json.dumps({"object": "list", "data": [{"id": m, "owned_by": owner} for m in models]}).encode()


class PathHTTP:
    """Answers each path from a table (status, body); a path not in it is a 404; ``down`` refuses."""

    def __init__(self, table):
        self.table = table
        self.down = False
        self.asked = []

    def get(self, url, allow_redirects):
        path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
        self.asked.append(path)
        if self.down:
            return fail(ConnectionRefusedError())
        status, body = self.table.get(path, (404, b"{}"))
        return succeed(FakeResponse(status, body))


def monitor(table, paths=(), **node_fields):
    clock, http, registry = Clock(), PathHTTP(table), NodeRegistry()
    registry.add(Node(id="n", name="n", base_url="http://10.0.0.1:8000", **node_fields))
    health = HealthMonitor(registry, http, clock, 5.0, 3.0, paths, frozenset(range(200, 300)),
                           HealthRules(rise=2, fall=1))
    return clock, http, registry.stats("n"), health


def test_llama_cpp_python_without_health_is_up_with_its_models_and_no_setting():
    clock, http, stats, health = monitor({"/v1/models": (200, models_body("smol-a", owner="me"))})
    health.startService()
    assert (stats.health.state, stats.engine, stats.models) == (UP, "llamacpp", ("smol-a",))
    assert http.asked == ["/v1/models", "/health"]  # /v1/models asked once: a run's answers are reused
    http.asked.clear()
    clock.advance(5)  # detected: the next run asks llama.cpp's paths only
    assert http.asked == ["/health", "/v1/models"]
    health.stopService()


def test_llama_cpp_loading_is_loading_then_up():
    loading = (503, b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')
    table = {"/health": loading, "/v1/models": loading}
    clock, http, stats, health = monitor(table, engine="llamacpp")
    health.startService()
    assert stats.health.state == LOADING
    table["/health"] = (200, b'{"status":"ok"}')
    table["/v1/models"] = (200, models_body("q", owner="llamacpp"))
    clock.advance(5)
    assert (stats.health.state, stats.models) == (UP, ("q",))
    health.stopService()


def test_ollama_is_probed_on_its_own_paths_and_lists_its_tags():
    table = {"/api/version": (200, b'{"version":"0.6.0"}'),
             "/api/tags": (200, b'{"models":[{"name":"llama3:latest","model":"llama3:latest"}]}'),
             "/v1/models": (200, models_body("llama3:latest", owner="library"))}
    clock, http, stats, health = monitor(table)
    health.startService()
    assert (stats.health.state, stats.engine, stats.models) == (UP, "ollama", ("llama3:latest",))
    assert "/health" not in http.asked
    health.stopService()


def test_tgi_models_come_from_info():
    table = {"/health": (200, b""), "/info": (200, b'{"model_id":"bigscience/bloom-560m"}')}
    clock, http, stats, health = monitor(table)
    health.startService()
    assert (stats.health.state, stats.engine, stats.models) == (UP, "tgi", ("bigscience/bloom-560m",))
    health.stopService()


def test_declared_models_are_not_read_and_explicit_paths_override_the_engine():
    clock, http, stats, health = monitor({"/ready": (200, b"")}, paths=("/ready",), engine="vllm", models=("a",))
    health.startService()
    assert (stats.health.state, stats.models, http.asked) == (UP, None, ["/ready"])
    health.stopService()


def test_a_node_that_goes_down_is_detected_again_when_it_comes_back():
    table = {"/v1/models": (200, models_body("a", owner="vllm")), "/health": (200, b"")}
    clock, http, stats, health = monitor(table)
    health.startService()
    assert (stats.health.state, stats.engine) == (UP, "vllm")
    http.down = True
    clock.advance(5)
    assert (stats.health.state, stats.engine, stats.models) == (DOWN, None, ("a",))  # the list stays known
    http.down = False
    table["/v1/models"] = (200, models_body("b", owner="sglang"))
    clock.advance(5)
    assert (stats.health.state, stats.engine) == (DOWN, "sglang")  # HEALTH_RISE passes bring it back
    clock.advance(5)
    assert (stats.health.state, stats.engine, stats.models) == (UP, "sglang", ("b",))
    health.stopService()


def test_a_node_refusing_connections_is_asked_once_per_run():
    clock, http, stats, health = monitor({})
    http.down = True
    health.startService()
    assert stats.health.state == DOWN
    assert http.asked == ["/v1/models", "/health"]  # no detection past a first probe without answer
    health.stopService()


def test_a_busy_llama_cpp_python_node_is_not_asked_for_its_models():
    """llama-cpp-python ends a running stream when /v1/models arrives: no probe while requests run."""
    clock, http, stats, health = monitor({"/v1/models": (200, models_body("smol", owner="me"))})
    health.startService()
    assert stats.health.state == UP
    stats.in_flight = 1
    http.asked.clear()
    before = stats.health
    clock.advance(5)
    assert http.asked == ["/health"] and stats.health == before  # the run changed nothing
    stats.in_flight = 0
    clock.advance(5)
    assert http.asked == ["/health", "/health", "/v1/models"]
    health.stopService()
