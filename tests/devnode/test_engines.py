"""A devnode speaking like each engine: its paths, health, loading phase, model lists and metrics."""

from __future__ import annotations

import pytest

from blyanproxy.core.engines import DETECTION_PATHS, Answer, detect, models_from
from blyanproxy.devnode import DevNode, DevNodeConfig
from blyanproxy.devnode.engines import ENGINES
from tests.devnode.test_devnode import ask, sent

STREAM = b'{"model": "m-a", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


def node(engine: str, **config) -> DevNode:
    from twisted.internet.task import Clock

    return DevNode(DevNodeConfig(engine=engine, models=("m-a", "m-b"), **config), Clock())


@pytest.mark.parametrize("engine, expected", [
    ("blyan", "blyan"), ("vllm", "vllm"), ("sglang", "sglang"), ("llamacpp", "llamacpp"),
    ("ollama", "ollama"), ("tgi", "tgi"),
])
def test_the_proxy_detects_each_simulated_engine(engine, expected):
    simulated = node(engine)
    seen = []
    for path in DETECTION_PATHS:
        answer = ask(simulated, "GET", path)
        seen.append((path, Answer(answer.status, answer.body)))
        done, found = detect(seen)
        if done:
            break
    assert found == expected


@pytest.mark.parametrize("engine, path, models", [
    ("vllm", "/v1/models", ("m-a", "m-b")), ("ollama", "/api/tags", ("m-a", "m-b")), ("tgi", "/info", ("m-a",)),
])
def test_model_lists_in_each_engine_shape(engine, path, models):
    answer = ask(node(engine), "GET", path)
    assert models_from(path, Answer(answer.status, answer.body)) == models


def test_each_engine_serves_only_its_own_paths():
    assert ask(node("vllm"), "GET", "/api/tags").status == 404
    assert ask(node("ollama"), "GET", "/health").status == 404
    assert ask(node("ollama"), "GET", "/").body == b"Ollama is running"
    assert ask(node("llamacpp"), "GET", "/health").json() == {"status": "ok"}
    assert ask(node("vllm"), "GET", "/health").body == b""
    assert ask(node("sglang"), "GET", "/get_model_info").json()["model_path"] == "m-a"
    for engine in ENGINES:
        simulated = node(engine)
        client = sent(simulated, "POST", "/v1/chat/completions",
                      b'{"model": "m-b", "messages": [{"role": "user", "content": "hi"}]}')
        simulated.clock.advance(10)
        assert client.response().json()["model"] == "m-b"


def test_loading_phase_as_each_engine_shows_it():
    llama = node("llamacpp", loading_ms=1000)
    answer = ask(llama, "GET", "/v1/models")  # llama.cpp refuses every path while loading
    assert (answer.status, answer.json()["error"]["message"]) == (503, "Loading model")
    vllm = node("vllm", loading_ms=1000)
    assert ask(vllm, "GET", "/health").status == 503
    assert ask(vllm, "GET", "/v1/models").status == 200
    vllm.clock.advance(1.0)
    assert ask(vllm, "GET", "/health").status == 200
    assert ask(node("ollama", loading_ms=1000), "GET", "/api/version").status == 200


@pytest.mark.parametrize("engine, names", [
    ("vllm", ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]),
    ("sglang", ["sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"]),
    ("llamacpp", ["llamacpp:requests_processing", "llamacpp:requests_deferred"]),
    ("tgi", ["tgi_batch_current_size", "tgi_queue_size"]),
])
def test_metrics_in_each_engine_names_count_running_streams(engine, names):
    simulated = node(engine, tokens_per_second=1.0)
    idle = ask(simulated, "GET", "/metrics")
    assert idle.status == 200 and all(f"# TYPE {name} gauge" in idle.body.decode() for name in names)
    sent(simulated, "POST", "/v1/chat/completions", STREAM)  # one stream generating
    running = ask(simulated, "GET", "/metrics").body.decode()
    line = next(line for line in running.splitlines() if line.startswith(names[0]))
    assert line.endswith(" 1.0")


def test_ollama_ps_and_llama_slots_show_the_work():
    ollama = node("ollama", tokens_per_second=1.0)
    assert ask(ollama, "GET", "/api/ps").json() == {"models": []}
    sent(ollama, "POST", "/v1/chat/completions", STREAM)
    assert [m["name"] for m in ask(ollama, "GET", "/api/ps").json()["models"]] == ["m-a", "m-b"]
    llama = node("llamacpp", tokens_per_second=1.0)
    sent(llama, "POST", "/v1/chat/completions", STREAM)
    assert [slot["is_processing"] for slot in ask(llama, "GET", "/slots").json()] == [True, False, False, False]
