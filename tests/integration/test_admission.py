"""Admission over real sockets: node caps, the fair queue, rate limits and token counts, with simulated nodes."""

import json

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from .rawhttp import connect, error_code, eventually, sleep

MODEL = "blyan-sim-7b"


def chat_body(max_tokens: int = 4, stream: bool = True, include_usage: bool = False, words: str = "hi") -> bytes:
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": words}], "stream": stream,
                  "max_tokens": max_tokens}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def raw_chat(key: str | None = None, max_tokens: int = 4) -> bytes:
    """A raw streamed chat completion request, with a Bearer ``key`` if given."""
    body = chat_body(max_tokens)
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (auth, len(body), body))


def chat(proxy, key: str | None = None, **fields):
    headers = {"Content-Type": ["application/json"]}
    if key is not None:
        headers["Authorization"] = [f"Bearer {key}"]
    return treq.post(proxy.url + "/v1/chat/completions", data=chat_body(**fields), headers=headers)


def queued(proxy) -> int:
    return len(proxy.parts.admission.admission.queue)


async def hold_the_slot(reactor, proxy, node):
    """A streamed request that takes the node's only slot until its client leaves."""
    blocker = await connect(reactor, proxy.url)
    blocker.transport.write(raw_chat(max_tokens=100000))
    await eventually(reactor, lambda: node.node.stats.open_streams == 1)
    return blocker


@pytest_twisted.ensureDeferred
async def test_a_cap_of_two_never_shows_more_than_two_at_the_node(devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=100.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url], node_max_inflight=2)
    answers = await defer.gatherResults([chat(proxy, max_tokens=5) for _ in range(8)])
    bodies = await defer.gatherResults([treq.content(answer) for answer in answers])
    assert [answer.code for answer in answers] == [200] * 8
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    assert node.node.stats.streams_completed == 8
    assert node.node.stats.most_open_streams == 2


@pytest_twisted.ensureDeferred
async def test_queued_requests_are_served_in_fair_order(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=200.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url], node_max_inflight=1)
    blocker = await hold_the_slot(reactor, proxy, node)
    served: list[str] = []
    pending = []
    for count, key in enumerate(["sk-a", "sk-a", "sk-a", "sk-b", "sk-c", "sk-b"], start=1):
        answer = chat(proxy, key=key, max_tokens=2)
        pending.append(answer.addCallback(treq.content).addCallback(lambda _, key=key: served.append(key)))
        await eventually(reactor, lambda count=count: queued(proxy) == count)
    blocker.transport.loseConnection()
    await defer.gatherResults(pending)
    assert served == ["sk-a", "sk-b", "sk-c", "sk-a", "sk-b", "sk-a"]


@pytest_twisted.ensureDeferred
async def test_high_priority_goes_first(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=200.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url], node_max_inflight=1)
    blocker = await hold_the_slot(reactor, proxy, node)
    served: list[str] = []
    pending = []
    for count, band in enumerate(["low", "normal", "high"], start=1):
        answer = treq.post(proxy.url + "/v1/chat/completions", data=chat_body(2),
                           headers={"X-Priority": [band], "Authorization": [f"Bearer sk-{band}"]})
        pending.append(answer.addCallback(treq.content).addCallback(lambda _, band=band: served.append(band)))
        await eventually(reactor, lambda count=count: queued(proxy) == count)
    assert proxy.parts.admission.admission.queue.depth_by_band() == {"high": 1, "normal": 1, "low": 1}
    blocker.transport.loseConnection()
    await defer.gatherResults(pending)
    assert served == ["high", "normal", "low"]


@pytest_twisted.ensureDeferred
async def test_queue_full_and_queue_timeout_carry_a_retry_after(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=200.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url], node_max_inflight=1, queue_max=1, queue_timeout=0.5)
    blocker = await hold_the_slot(reactor, proxy, node)
    waiting = chat(proxy, max_tokens=2)
    await eventually(reactor, lambda: queued(proxy) == 1)
    full = await chat(proxy, max_tokens=2)
    assert full.code == 429
    assert error_code(json.loads(await treq.content(full))) == "queue_full"
    assert 1 <= int(full.headers.getRawHeaders("retry-after")[0]) <= 60
    timed_out = await waiting
    assert timed_out.code == 503
    assert error_code(json.loads(await treq.content(timed_out))) == "queue_timeout"
    assert 1 <= int(timed_out.headers.getRawHeaders("retry-after")[0]) <= 60
    blocker.transport.loseConnection()
    metrics = proxy.parts.metrics.render().decode()
    assert 'blyan_admission_rejections_total{reason="queue_full"} 1.0' in metrics
    assert 'blyan_admission_rejections_total{reason="queue_timeout"} 1.0' in metrics
    assert 'blyan_queue_wait_seconds_count{outcome="timeout"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_a_client_gone_from_the_queue_never_reaches_a_node(reactor, devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=200.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url], node_max_inflight=1)
    blocker = await hold_the_slot(reactor, proxy, node)
    leaver = await connect(reactor, proxy.url)
    leaver.transport.write(raw_chat(max_tokens=2))
    await eventually(reactor, lambda: queued(proxy) == 1)
    leaver.transport.loseConnection()
    await eventually(reactor, lambda: queued(proxy) == 0)
    blocker.transport.loseConnection()
    await eventually(reactor, lambda: node.node.stats.open_streams == 0)
    after = await chat(proxy, max_tokens=2)  # the slot is free again: it was not kept for the one who left
    await treq.content(after)
    assert after.code == 200
    await sleep(reactor, 0.05)
    assert node.node.stats.by_path["/v1/chat/completions"] == 2  # the blocker and the last one only


@pytest_twisted.ensureDeferred
async def test_rate_limits_answer_429_with_the_openai_headers(devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=500.0, ttft_ms=0.0)
    proxy = await proxy_factory([node.url], rate_limit_rpm=2)
    first = await chat(proxy, key="sk-one", max_tokens=1)
    await treq.content(first)
    assert first.code == 200
    assert first.headers.getRawHeaders("x-ratelimit-limit-requests") == ["2"]
    assert first.headers.getRawHeaders("x-ratelimit-remaining-requests") == ["1"]
    await treq.content(await chat(proxy, key="sk-one", max_tokens=1))
    refused = await chat(proxy, key="sk-one", max_tokens=1)
    assert refused.code == 429
    assert error_code(json.loads(await treq.content(refused))) == "rate_limited"
    assert refused.headers.getRawHeaders("x-ratelimit-remaining-requests") == ["0"]
    assert refused.headers.getRawHeaders("x-ratelimit-reset-requests")[0].endswith("s")
    assert int(refused.headers.getRawHeaders("retry-after")[0]) == 30
    other = await chat(proxy, key="sk-two", max_tokens=1)  # another key has its own limit
    await treq.content(other)
    assert other.code == 200
    view = proxy.parts.admission.admission.view()["callers"]
    assert all(name.startswith(("key-", "127.")) for name in view)  # keys by their hash only
    assert "sk-one" not in json.dumps(view)

    def use_openai():
        from openai import OpenAI, RateLimitError

        client = OpenAI(base_url=proxy.url + "/v1", api_key="sk-one", max_retries=0, timeout=10)
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        except RateLimitError as error:
            return error.status_code
        return None

    assert await deferToThread(use_openai) == 429


@pytest_twisted.ensureDeferred
async def test_token_counts_match_the_nodes_usage(devnode_factory, proxy_factory):
    node = devnode_factory(tokens_per_second=500.0, ttft_ms=0.0)
    ollama = devnode_factory(tokens_per_second=500.0, ttft_ms=0.0, engine="ollama")
    proxy = await proxy_factory([node.url, ollama.url])
    for spec in proxy.registry.nodes():
        if spec.name == "node1":
            proxy.registry.update(spec.id, engine="ollama", tags=("ollama",))
        else:
            proxy.registry.update(spec.id, tags=("openai",))
    streamed = await treq.post(proxy.url + "/tags/openai/v1/chat/completions",
                               data=chat_body(7, include_usage=True, words="one two three"),
                               headers={"Authorization": ["Bearer sk-tokens"]})
    body = await treq.content(streamed)
    usage_event = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")][-1]["usage"]
    whole = await treq.post(proxy.url + "/tags/openai/v1/chat/completions", data=chat_body(5, stream=False),
                            headers={"Authorization": ["Bearer sk-tokens"]})
    whole_usage = json.loads(await treq.content(whole))["usage"]
    ollama_body = json.dumps({"model": MODEL, "prompt": "a b", "options": {"num_predict": 3}}).encode()
    answered = await treq.post(proxy.url + "/tags/ollama/api/generate", data=ollama_body,
                               headers={"Authorization": ["Bearer sk-tokens"]})  # streamed NDJSON
    ollama_answer = json.loads((await treq.content(answered)).splitlines()[-1])
    expected_in = usage_event["prompt_tokens"] + whole_usage["prompt_tokens"] + ollama_answer["prompt_eval_count"]
    expected_out = (usage_event["completion_tokens"] + whole_usage["completion_tokens"]
                    + ollama_answer["eval_count"])
    assert usage_event["completion_tokens"] == 7 and ollama_answer["eval_count"] == 3
    callers = proxy.parts.admission.admission.view()["callers"]
    (totals,) = [usage for name, usage in callers.items() if name.startswith("key-")]
    assert (totals["tokens_in"], totals["tokens_out"]) == (expected_in, expected_out)
    metrics = proxy.parts.metrics.render().decode()
    assert f'blyan_tokens_total{{kind="out",model="{MODEL}",node="node1"}} 3.0' in metrics
    assert f'blyan_tokens_total{{kind="out",model="{MODEL}",node="node0"}} 12.0' in metrics
