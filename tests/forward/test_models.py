"""forward.models: the model lists the proxy answers itself, as pure functions of the pool's usable nodes."""

import pytest

from blyanproxy.core import Node, NodeStats, ProxyError, parse_route
from blyanproxy.forward.models import body_for, served, wanted


def entry(index, engine="auto", models=(), detected=None, learned=None):
    node = Node(id=f"n{index}", name=f"n{index}", base_url=f"http://10.0.0.{index}", engine=engine, models=models,
                added_at=1700000000.0 + index)
    return node, NodeStats(engine=detected, models=learned)


def test_each_model_once_in_node_order_owned_by_the_first_engine():
    entries = [entry(1, detected="vllm", learned=("a", "b")), entry(2, engine="tgi", models=("b", "c")), entry(3)]
    assert [(m.id, m.owned_by) for m in served(entries)] == [("a", "vllm"), ("b", "vllm"), ("c", "tgi")]
    assert served([entry(3)]) is None  # no list known: a node answers instead
    assert served([entry(3, learned=())]) == []


def test_list_one_model_and_ollama_tags():
    entries = [entry(1, detected="vllm", learned=("a",)), entry(2, engine="ollama", models=("llama3:latest",))]
    listing = body_for(b"/v1/models", entries)
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["a", "llama3:latest"]
    assert body_for(b"/v1/models/llama3%3Alatest", entries)["id"] == "llama3:latest"
    with pytest.raises(ProxyError) as missing:
        body_for(b"/v1/models/org/none", entries)
    assert missing.value.code == "model_not_found" and "org/none" in missing.value.message
    assert [m["name"] for m in body_for(b"/api/tags", entries)["models"]] == ["a", "llama3:latest"]
    assert body_for(b"/api/tags", entries[:1]) is None  # no Ollama node: /api/tags goes to a node


def test_which_requests_are_model_lists():
    assert wanted(parse_route(b"/v1/models?x=1"), b"GET") == b"/v1/models"
    assert wanted(parse_route(b"/tags/gpu/v1/models/m"), b"GET") == b"/v1/models/m"
    assert wanted(parse_route(b"/api/tags"), b"GET") == b"/api/tags"
    assert wanted(parse_route(b"/v1/models"), b"POST") is None
    assert wanted(parse_route(b"/v1/modelsx"), b"GET") is None


def test_the_model_is_read_from_the_body_of_an_inference_post_only():
    from blyanproxy.forward.resource import with_model

    body = b'{"messages": [{"role": "user", "content": "hi"}], "model": "m-1"}'
    chat = with_model(parse_route(b"/v1/chat/completions"), b"POST", body)
    assert chat.model == "m-1" and chat.body == body and chat.prefix_key is not None
    assert with_model(parse_route(b"/api/generate"), b"POST", body).model == "m-1"
    other = with_model(parse_route(b"/v1/other"), b"POST", body)
    assert other.model is None and other.prefix_key is None  # not an inference path: the body is not kept
    assert with_model(parse_route(b"/v1/chat/completions"), b"GET", body).model is None
    assert with_model(parse_route(b"/v1/chat/completions"), b"POST", b"{}").model is None
