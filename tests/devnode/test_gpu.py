"""The simulated GPU: a max_num_seqs limit with a waiting queue, and a prefix cache that sets the
time to first token, seen through the node's own answers and metrics."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from blyanproxy.core import figures_from
from blyanproxy.devnode import DevNode, DevNodeConfig
from blyanproxy.devnode.gpu import BLOCK_TOKENS, Gpu, block_names, prompt_words
from tests.devnode.test_devnode import ask, sent, stream_events

SYSTEM = " ".join(f"w{i}" for i in range(10 * BLOCK_TOKENS))


def chat(*contents: str) -> bytes:
    messages = [{"role": "system", "content": SYSTEM}] + [{"role": "user", "content": c} for c in contents]
    return json.dumps({"model": "m", "stream": True, "messages": messages}).encode()


def gpu_node(engine: str = "vllm", **config) -> DevNode:
    settings = dict(engine=engine, models=("m",), ttft_ms=10, prompt_token_ms=1.0, tokens_per_second=100,
                    max_tokens=2)
    settings.update(config)
    return DevNode(DevNodeConfig(**settings), Clock())


def first_token_after(node: DevNode, body: bytes, step: float = 0.001) -> float:
    client = sent(node, "POST", "/v1/chat/completions", body)
    waited = 0.0
    while not stream_events(client.response()):
        node.clock.advance(step)
        waited += step
        assert waited < 5
    node.clock.advance(1)
    assert client.response().complete
    return waited


def test_a_cached_prefix_makes_the_first_token_come_sooner():
    node = gpu_node()
    cold = first_token_after(node, chat("hello there"))
    warm = first_token_after(node, chat("another question"))
    assert cold > 0.15  # 10 ms + about 160 uncached tokens at 1 ms
    assert warm < 0.05  # the system prompt's blocks were cached
    assert node.gpu.cached_tokens >= 10 * BLOCK_TOKENS


def test_a_small_cache_forgets_the_least_recently_used_prefix():
    gpu = Gpu()
    first, second = [f"a{i}" for i in range(32)], [f"b{i}" for i in range(32)]
    assert gpu.prefill(first, 2) == 32
    assert gpu.prefill(second, 2) == 32
    assert gpu.prefill(first, 2) == 32  # evicted by the second prompt
    assert gpu.prefill(first, 2) == 0


def test_block_names_cover_the_whole_prefix():
    words = [f"x{i}" for i in range(40)]
    changed = ["y"] + words[1:]
    assert len(block_names(words)) == 2
    assert block_names(words)[1] != block_names(changed)[1]  # same block text, another prefix
    assert prompt_words(b"not json") == [] and prompt_words(b'{"prompt": "a b"}') == ["a", "b"]


def test_requests_beyond_max_num_seqs_wait_and_show_in_the_metrics():
    node = gpu_node(max_num_seqs=1, prompt_token_ms=0.0, tokens_per_second=10, max_tokens=3)
    first = sent(node, "POST", "/v1/chat/completions", chat("one"))
    second = sent(node, "POST", "/v1/chat/completions", chat("two"))
    figures = figures_from("vllm", "/metrics", 200, ask(node, "GET", "/metrics").body, 0.0)
    assert figures is not None and (figures.running, figures.waiting) == (1.0, 1.0)
    node.clock.advance(0.05)
    assert stream_events(first.response()) and node.gpu.waiting == 1  # nothing sent to the second yet
    node.clock.pump([0.05] * 6)
    assert first.response().complete and stream_events(second.response())
    node.clock.pump([0.1] * 10)
    assert second.response().complete and (node.gpu.running, node.gpu.waiting) == (0, 0)


def test_a_client_gone_while_waiting_leaves_the_queue():
    node = gpu_node(engine="sglang", max_num_seqs=1, tokens_per_second=10, max_tokens=3)
    sent(node, "POST", "/v1/chat/completions", chat("one"))
    waiting = sent(node, "POST", "/v1/chat/completions", chat("two"))
    figures = figures_from("sglang", "/metrics", 200, ask(node, "GET", "/metrics").body, 0.0)
    assert figures is not None and figures.waiting == 1.0
    waiting.leave()
    assert node.gpu.waiting == 0
    node.clock.pump([0.1] * 20)
    assert (node.gpu.running, node.gpu.waiting) == (0, 0)


def test_a_whole_answer_waits_for_its_slot_too():
    node = gpu_node(max_num_seqs=1, prompt_token_ms=0.0, tokens_per_second=10, max_tokens=3)
    sent(node, "POST", "/v1/chat/completions", chat("one"))
    whole = sent(node, "POST", "/v1/chat/completions", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert node.gpu.waiting == 1
    node.clock.pump([0.1] * 20)
    answer = whole.response()
    assert answer.complete and json.loads(answer.body)["choices"][0]["message"]["content"]
