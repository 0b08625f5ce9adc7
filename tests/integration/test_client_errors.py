"""The proxy's own errors as the openai SDK and the ollama client see them, over real sockets.

Each client parses the shape of its API (OpenAI's on ``/v1``, Ollama's on
``/api/generate``): the message, the code word (OpenAI) and the status reach
the caller, and so does the request id the client sent. The clients are
synchronous, so each runs in a thread while the reactor serves the proxy and
the simulated nodes.
"""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

MODEL = "blyan-sim-7b"


@attrs.frozen
class Case:
    """One error the proxy produces: how to provoke it, and what the client must see."""

    name: str
    status: int
    code: str
    message: str
    prefix: str = ""  # between the proxy's address and the API's own path
    query: dict = attrs.field(factory=dict)
    prompt: str = "hi"
    node: dict | None = attrs.field(factory=dict)  # the devnode's config; None: no node at all
    proxy: dict = attrs.field(factory=dict)


CASES = [
    Case("no node", 503, "no_healthy_nodes", "no healthy node can take the request", node=None),
    Case("unknown tag", 404, "unknown_tag", "no nodes found for tag: nope", prefix="/tags/nope"),
    Case("index out of range", 404, "index_out_of_range", "Workload index 5 out of range (0-0)", prefix="/5"),
    Case("node not found", 404, "node_not_found", "no registered node has the id or name api= gives",
         query={"api": "ghost"}),
    Case("body too large", 413, "body_too_large", "the request body exceeds 2000 bytes", prompt="x" * 3000,
         proxy={"max_body_bytes": 2000}),
    Case("timeout", 504, "upstream_timeout", "the node did not answer in time", node={"hang": True},
         proxy={"proxy_timeout": 0.2}, prefix="/tags/all"),  # /tags/all: /api/generate reaches the node as such
]


async def start(case: Case, devnode_factory, proxy_factory):
    nodes = [] if case.node is None else [devnode_factory(**case.node).url]
    return await proxy_factory(nodes, **case.proxy)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_raises_each_proxy_error_with_its_message_and_code(case, devnode_factory, proxy_factory):
    import openai

    proxy = await start(case, devnode_factory, proxy_factory)
    request_id = "sdk-" + case.code

    def call():
        client = openai.OpenAI(base_url=proxy.url + case.prefix + "/v1", api_key="sk-test", max_retries=0,
                               timeout=10, default_query=case.query, default_headers={"X-Request-Id": request_id})
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": case.prompt}])
        return raised.value

    error = await deferToThread(call)
    expected_class = {404: openai.NotFoundError, 503: openai.InternalServerError,
                      504: openai.InternalServerError}.get(case.status, openai.APIStatusError)
    assert type(error) is expected_class
    assert (error.status_code, error.code, error.message) == (
        case.status, case.code, f"Error code: {case.status} - {case.message}")
    assert error.type == ("server_error" if case.status >= 500 else "invalid_request_error")
    assert error.param == ("api" if case.code == "node_not_found" else None)
    assert error.request_id == request_id and error.response.json()["request_id"] == request_id


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest_twisted.ensureDeferred
async def test_the_ollama_client_raises_each_proxy_error_with_its_message(case, devnode_factory, proxy_factory):
    import ollama

    proxy = await start(case, devnode_factory, proxy_factory)

    def call():
        client = ollama.Client(host=proxy.url + case.prefix, timeout=10, params=case.query,
                               headers={"X-Request-Id": "ollama-" + case.code})
        with pytest.raises(ollama.ResponseError) as raised:
            client.generate(model=MODEL, prompt=case.prompt)
        return raised.value

    error = await deferToThread(call)
    assert (error.status_code, error.error) == (case.status, case.message)


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_stream_raises_the_broken_streams_message_and_code(devnode_factory, proxy_factory):
    import openai

    node = devnode_factory(tokens_per_second=200.0, ttft_ms=0.0, max_tokens=50, close_after=3)
    proxy = await proxy_factory([node.url])

    def call():
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
        received = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
                received.append(chunk)
        return raised.value, received

    error, received = await deferToThread(call)
    assert received  # the tokens sent before the break reached the caller
    assert error.message.startswith("the node's response broke off (")
    assert (error.code, error.type) == ("upstream_broke", "server_error")


@pytest_twisted.ensureDeferred
async def test_the_ollama_client_stream_raises_the_broken_streams_message(devnode_factory, proxy_factory):
    import ollama

    node = devnode_factory(tokens_per_second=200.0, ttft_ms=0.0, max_tokens=50, close_after=3)
    proxy = await proxy_factory([node.url])

    def call():
        client = ollama.Client(host=proxy.url + "/tags/all", timeout=10)  # the node keeps /api: Ollama's path
        received = []
        with pytest.raises(ollama.ResponseError) as raised:
            for part in client.generate(model=MODEL, prompt="hi", stream=True):
                received.append(part)
        return raised.value, received

    error, received = await deferToThread(call)
    assert received and not received[-1].done
    assert error.error.startswith("the node's response broke off (")
