"""core.engines: detection from probe answers, what a probe answer means, model lists."""

import json

import pytest

from blyanproxy.core.engines import (
    DETECTION_PATHS,
    FAILED,
    LOADING,
    NOT_HERE,
    PASSED,
    Answer,
    detect,
    models_from,
    probe_verdict,
    served_models,
    strips_api,
)

OK = frozenset(range(200, 300))


def listing(*models, owner="vllm"):
    return Answer(200, json.dumps({"object": "list", "data": [{"id": m, "owned_by": owner} for m in models]}).encode())


def run_detection(answers):
    """Feed DETECTION_PATHS' answers in order, as the health monitor does; the paths asked and the result."""
    seen = []
    for path in DETECTION_PATHS:
        seen.append((path, answers.get(path, Answer(404))))
        done, engine = detect(seen)
        if done:
            return [p for p, _ in seen], engine
    raise AssertionError("detection never ended")


@pytest.mark.parametrize("owner, engine", [("vllm", "vllm"), ("sglang", "sglang"), ("llamacpp", "llamacpp"),
                                           ("me", "llamacpp"), ("library", "ollama")])
def test_the_model_list_owner_names_the_engine_in_one_probe(owner, engine):
    assert run_detection({"/v1/models": listing("m", owner=owner)}) == (["/v1/models"], engine)


def test_ollama_tgi_openai_and_blyan_are_told_apart():
    assert run_detection({"/api/version": Answer(200, b'{"version": "0.5.1"}')})[1] == "ollama"
    assert run_detection({"/v1/models": listing("x", owner="someone"),
                          "/info": Answer(200, b'{"model_id": "bigscience/bloom"}')}) == (
        ["/v1/models", "/api/version", "/info"], "tgi")
    assert run_detection({"/v1/models": listing("x", owner="someone")}) == (list(DETECTION_PATHS), "openai")
    assert run_detection({"/health": Answer(200, b"{}")}) == (list(DETECTION_PATHS), "blyan")
    assert run_detection({})[1] is None


def test_a_404_is_not_here_and_a_503_while_starting_is_loading():
    assert probe_verdict("llamacpp", Answer(404), OK, was_up=False) == NOT_HERE
    assert probe_verdict("vllm", Answer(200), OK, was_up=False) == PASSED
    assert probe_verdict("vllm", Answer(503), OK, was_up=False) == LOADING
    assert probe_verdict("vllm", Answer(503), OK, was_up=True) == FAILED  # an engine that was up and fails
    assert probe_verdict("openai", Answer(503), OK, was_up=False) == FAILED
    loading = Answer(503, b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')
    assert probe_verdict(None, loading, OK, was_up=False) == LOADING
    assert probe_verdict("llamacpp", Answer(500), OK, was_up=False) == FAILED


def test_model_lists_of_each_shape():
    assert models_from("/v1/models", listing("a", "b", "a")) == ("a", "b")
    assert models_from("/api/tags", Answer(200, b'{"models": [{"name": "llama3:latest"}, {"name": 3}]}')) == (
        "llama3:latest",)
    assert models_from("/info", Answer(200, b'{"model_id": "m/x"}')) == ("m/x",)
    assert models_from("/v1/models", Answer(200, b"not json")) is None
    assert models_from("/v1/models", Answer(503, b"{}")) is None
    assert models_from("/v1/models", None) is None


def test_declared_models_win_and_only_ollama_keeps_api():
    assert served_models(("a",), ("b",)) == ("a",)
    assert served_models((), ("b",)) == ("b",)
    assert served_models((), None) is None
    assert not strips_api("ollama")
    assert all(strips_api(e) for e in (None, "auto", "vllm", "blyan", "openai"))
