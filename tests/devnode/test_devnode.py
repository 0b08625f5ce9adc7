"""Unit tests of the simulated GPU node: pure parts directly, the HTTP face in memory on a Clock."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure

from blyanproxy.devnode import MAX_TOKENS_CAP, DevNode, DevNodeConfig
from blyanproxy.devnode import tap as devnode_tap
from blyanproxy.devnode.config import (
    SettingError,
    apply_knobs,
    evolve_from_text,
    parse_flag,
    request_knobs,
)
from blyanproxy.devnode.site import DevNodeSite
from blyanproxy.devnode.stream import TokenSchedule
from blyanproxy.devnode.wire import (
    ApiError,
    ChatFormat,
    CompletionRequest,
    GenerateFormat,
    completion_text,
    injected_failure,
    ndjson_line,
    parse_chat_request,
    parse_generate_request,
    sse_event,
)

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
CHAT = b'{"messages":[{"role":"user","content":"say hi"}]'  # a chat request body, still open
STREAM = CHAT + b',"stream":true}'


# --- config and knobs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"tokens_per_second": 0},
        {"tokens_per_second": -1.0},
        {"tokens_per_second": float("nan")},
        {"tokens_per_second": "50"},
        {"ttft_ms": True},
        {"ttft_ms": -0.5},
        {"max_tokens": 0},
        {"max_tokens": MAX_TOKENS_CAP + 1},
        {"max_tokens": 2.0},
        {"fail_status": 200},
        {"close_after": -1},
        {"hang": 1},
        {"health_status": 600},
        {"health_delay_ms": float("inf")},
        {"name": " "},
        {"models": ()},
        {"models": ("a,b",)},
    ],
)
def test_config_rejects_bad_values(changes):
    with pytest.raises((TypeError, ValueError)):
        DevNodeConfig(**changes)


def test_config_accepts_model_list_or_single_name():
    assert DevNodeConfig(models=["a", "b"]).models == ("a", "b")
    assert DevNodeConfig(models="solo").models == ("solo",)


def test_evolve_from_text_parses_each_field():
    config = evolve_from_text(
        DevNodeConfig(),
        [
            ("--models", "models", "a, b"),
            ("--tps", "tokens_per_second", "7.5"),
            ("--tokens", "max_tokens", "3"),
            ("--fail-status", "fail_status", "502"),
            ("--hang", "hang", "yes"),
        ],
    )
    assert (config.models, config.tokens_per_second, config.max_tokens) == (("a", "b"), 7.5, 3)
    assert (config.fail_status, config.hang) == (502, True)


@pytest.mark.parametrize(
    "field, text", [("tokens_per_second", "fast"), ("tokens_per_second", "0"), ("hang", "maybe")]
)
def test_evolve_from_text_names_the_bad_setting_and_value(field, text):
    with pytest.raises(SettingError) as caught:
        evolve_from_text(DevNodeConfig(), [("knob-name", field, text)])
    assert (caught.value.name, caught.value.value) == ("knob-name", text)
    assert "knob-name" in str(caught.value) and repr(text) in str(caught.value)


@pytest.mark.parametrize("text, expected", [("1", True), ("On", True), ("no", False), ("", False)])
def test_parse_flag(text, expected):
    assert parse_flag(text) is expected


def test_request_knobs_from_headers_then_query():
    headers = [(b"X-Devnode-Tps", b"5"), (b"x-devnode-ttft-ms", b"0"), (b"X-Devnode-Set-Header", b"A: b")]
    query = {b"devnode_tps": [b"9"], b"other": [b"x"]}
    assert request_knobs(headers, query) == [
        ("tps", "tokens_per_second", "5"),
        ("ttft_ms", "ttft_ms", "0"),
        ("tps", "tokens_per_second", "9"),
    ]
    assert apply_knobs(DevNodeConfig(), headers, query).tokens_per_second == 9.0


def test_unknown_knob_is_an_error():
    with pytest.raises(SettingError) as caught:
        request_knobs([], {b"devnode_speed": [b"1"]})
    assert caught.value.name == "speed"


def test_failure_knob_can_be_switched_off_per_request():
    config = DevNodeConfig(fail_status=500, hang=True)
    assert (
        apply_knobs(config, [(b"X-Devnode-Fail-Status", b"none"), (b"X-Devnode-Hang", b"0")], {})
        == DevNodeConfig()
    )


# --- token schedule -----------------------------------------------------------------------------


def test_schedule_follows_ttft_then_rate():
    schedule = TokenSchedule.for_config(DevNodeConfig(ttft_ms=50, tokens_per_second=50), 4)
    assert [schedule.due_at(i) for i in range(4)] == pytest.approx([0.05, 0.07, 0.09, 0.11])
    assert [schedule.due_by(t) for t in (0.0, 0.049, 0.05, 0.0699, 0.07, 0.2)] == [0, 0, 1, 1, 2, 4]
    assert schedule.duration == pytest.approx(0.11)


@given(
    ttft_ms=st.floats(0, 5000),
    tps=st.floats(0.01, 100000),
    count=st.integers(1, 500),
    index=st.integers(0, 499),
)
def test_each_token_is_due_exactly_at_its_time(ttft_ms, tps, count, index):
    schedule = TokenSchedule.for_config(DevNodeConfig(ttft_ms=ttft_ms, tokens_per_second=tps), count)
    index = min(index, count - 1)
    assert schedule.due_by(schedule.due_at(index)) == index + 1
    assert schedule.due_by(schedule.due_at(index) - schedule.interval / 2) == index


# --- wire formats -------------------------------------------------------------------------------


def events(stream: bytes) -> list[bytes]:
    """The data of each SSE event, checking the framing."""
    assert stream.endswith(b"\n\n")
    found = []
    for event in stream[:-2].split(b"\n\n"):
        assert event.startswith(b"data: ") and b"\n" not in event
        found.append(event[len(b"data: ") :])
    return found


def chat_generation(**request) -> ChatFormat:
    completion = CompletionRequest(**{"model": "m", "stream": True, "prompt_tokens": 2, **request})
    return ChatFormat.create(completion, DevNodeConfig(max_tokens=3), now=1000.0)


def test_framing():
    assert sse_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert ndjson_line({"a": [1, 2]}) == b'{"a":[1,2]}\n'


def test_chat_stream_chunks():
    fmt = chat_generation()
    *data, done = events(b"".join(fmt.token(i) for i in range(3)) + fmt.end())
    assert done == b"[DONE]"
    chunks = [json.loads(chunk) for chunk in data]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {"chatcmpl-" + fmt.id}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == completion_text(3)
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]


def test_chat_stream_usage_chunk_when_asked():
    usage_chunk = json.loads(events(chat_generation(include_usage=True).end())[1])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_chat_whole_answer():
    whole = chat_generation(max_tokens=2).whole()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello from"}
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 2


def test_generate_lines():
    completion = parse_generate_request(b'{"model":"m","prompt":"a b c","options":{"num_predict":2}}', ["m"])
    fmt = GenerateFormat.create(completion, DevNodeConfig(), now=0.0)
    lines = [json.loads(line) for line in (fmt.token(0) + fmt.token(1) + fmt.end()).splitlines()]
    assert [line["done"] for line in lines] == [False, False, True]
    assert "".join(line["response"] for line in lines) == "Hello from"
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 2
    assert lines[0]["created_at"] == "1970-01-01T00:00:00.000000Z"
    assert fmt.whole()["response"] == "Hello from"


def test_chat_request_defaults_and_limits():
    request = parse_chat_request(CHAT + b"}", ["first", "second"])
    assert request == CompletionRequest(model="first", stream=False, prompt_tokens=2)
    assert request.length(DevNodeConfig(max_tokens=7)) == (7, "stop")
    huge = parse_chat_request(CHAT + b',"max_tokens":10000000,"stream":true}', ["m"])
    assert huge.stream and huge.length(DevNodeConfig()) == (MAX_TOKENS_CAP, "length")
    assert parse_generate_request(b"{}", ["m"]).stream is True


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{nope", 400, "invalid_json"),
        (b"\xff", 400, "invalid_json"),
        (b"[]", 400, "invalid_json"),
        (b'{"messages":[]}', 400, "invalid_messages"),
        (CHAT + b',"model":"gpt-9"}', 404, "model_not_found"),
        (CHAT + b',"max_tokens":0}', 400, "invalid_max_tokens"),
        (CHAT + b',"stream":"yes"}', 400, "invalid_stream"),
    ],
)
def test_bad_chat_requests(body, status, code):
    with pytest.raises(ApiError) as caught:
        parse_chat_request(body, ["m"])
    assert (caught.value.status, caught.value.code) == (status, code)
    assert set(caught.value.body()["error"]) == {"message", "type", "code"}


def test_injected_failure_shape():
    assert injected_failure(503).headers == ((b"Retry-After", b"1"),)
    assert injected_failure(500).headers == ()
    assert injected_failure(500).body() == {
        "error": {"message": "injected failure", "type": "server_error", "code": 500}
    }


# --- the HTTP face, in memory on a Clock --------------------------------------------------------


@attrs.frozen
class Response:
    """A parsed (possibly partial) HTTP/1.1 response."""

    status: int
    headers: list
    body: bytes
    complete: bool

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> object:
        return json.loads(self.body)


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body's bytes so far, and whether its last chunk arrived."""
    body = b""
    while True:
        size_line, crlf, rest = data.partition(b"\r\n")
        if not crlf:
            return body, False
        size = int(size_line, 16)
        if size == 0:
            return body, True
        body += rest[:size]
        if len(rest) < size + 2:
            return body, False
        data = rest[size + 2 :]


def parse_response(raw: bytes) -> Response:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines]
    response = Response(int(status_line.split()[1]), headers, b"", False)
    if response.header("transfer-encoding") == ["chunked"]:
        body, complete = dechunk(rest)
    else:
        length = int(response.header("content-length")[0])
        body, complete = rest[:length], len(rest) >= length
    return attrs.evolve(response, body=body, complete=complete)


class Client:
    """One in-memory connection to a node's Site."""

    def __init__(self, node: DevNode) -> None:
        self.protocol = node.site().buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.transport)

    def send(self, method: str, target: str, body: bytes = b"", headers: tuple[str, ...] = ()) -> None:
        lines = [
            f"{method} {target} HTTP/1.1",
            "Host: devnode",
            *headers,
            f"Content-Length: {len(body)}",
            "",
            "",
        ]
        self.protocol.dataReceived("\r\n".join(lines).encode("latin-1") + body)

    def response(self) -> Response:
        return parse_response(self.transport.value())

    def leave(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def make_node(**config) -> DevNode:
    return DevNode(DevNodeConfig(**config), Clock())


def sent(node: DevNode, method: str, target: str, body: bytes = b"", *headers: str) -> Client:
    """A new connection to ``node`` that has sent one request."""
    client = Client(node)
    client.send(method, target, body, headers)
    return client


def ask(node: DevNode, method: str, target: str, body: bytes = b"", *headers: str) -> Response:
    return sent(node, method, target, body, *headers).response()


def open_stream(**config) -> tuple[DevNode, Client]:
    """A node with ``config`` and a client that asked it for a streamed chat completion."""
    node = make_node(**config)
    return node, sent(node, "POST", "/v1/chat/completions", STREAM)


def stream_events(response: Response) -> list[bytes]:
    return events(response.body) if response.body else []


def test_stream_paced_by_clock():
    node, client = open_stream(ttft_ms=100, tokens_per_second=10, max_tokens=3)
    response = client.response()
    assert response.status == 200 and response.body == b"" and not response.complete
    assert response.header("content-type") == ["text/event-stream"]
    assert response.header("cache-control") == ["no-cache"]
    seen = []
    for step in (0.099, 0.001, 0.099, 0.001, 0.1):
        node.clock.advance(step)
        seen.append(len(stream_events(client.response())))
    assert seen == [0, 1, 1, 2, 5]  # the third token, then the finish chunk and [DONE] at once
    assert client.response().complete and stream_events(client.response())[-1] == b"[DONE]"
    assert (node.stats.streams_started, node.stats.streams_completed, node.stats.open_streams) == (1, 1, 0)
    assert node.stats.bytes_sent == len(client.response().body)


def test_late_stream_catches_up_in_one_write():
    node, client = open_stream(ttft_ms=0, tokens_per_second=1000, max_tokens=50)
    node.clock.advance(10)
    assert len(stream_events(client.response())) == 52 and client.response().complete


def test_client_leaving_cancels_the_stream_timer():
    node, client = open_stream(ttft_ms=10, tokens_per_second=10, max_tokens=5)
    node.clock.advance(0.01)
    client.leave()
    assert node.clock.getDelayedCalls() == []
    assert (node.stats.streams_aborted, node.stats.aborted_at, node.stats.open_streams) == (1, [0.01], 0)
    assert (node.stats.open_connections, node.stats.connections_lost) == (0, 1)


def test_close_after_aborts_the_connection_mid_body():
    node, client = open_stream(ttft_ms=0, tokens_per_second=10, max_tokens=5, close_after=2)
    node.clock.advance(0.1)
    assert len(stream_events(client.response())) == 2 and not client.transport.disconnected
    node.clock.advance(0.1)
    assert client.transport.disconnected and not client.response().complete
    assert len(stream_events(client.response())) == 2
    client.leave()
    assert (node.stats.streams_dropped, node.stats.streams_aborted, node.stats.open_streams) == (1, 0, 0)
    assert node.clock.getDelayedCalls() == []


def test_non_streamed_answer_waits_for_the_last_token():
    node = make_node(ttft_ms=250, tokens_per_second=4, max_tokens=3)
    client = sent(node, "POST", "/v1/chat/completions", CHAT + b"}")
    node.clock.advance(0.7)
    assert client.transport.value() == b""
    node.clock.advance(0.05)
    assert client.response().json()["choices"][0]["message"]["content"] == completion_text(3)


def test_hang_never_answers_and_forgets_the_client_when_it_leaves():
    node, client = open_stream(hang=True)
    node.clock.advance(3600)
    assert client.transport.value() == b"" and node.stats.hanging == 1
    client.leave()
    assert node.stats.hanging == 0 and node.clock.getDelayedCalls() == []


def test_fail_status_spares_health_and_diagnostics():
    node = make_node(fail_status=503)
    failed = ask(node, "GET", "/v1/models")
    assert failed.status == 503 and failed.header("retry-after") == ["1"]
    assert failed.json() == {"error": {"message": "injected failure", "type": "server_error", "code": 503}}
    assert ask(node, "GET", "/health").status == 200
    assert ask(node, "GET", "/_devnode/stats").status == 200


def test_knobs_per_request_by_header_and_query():
    node = make_node(ttft_ms=0)
    assert ask(node, "GET", "/api/tags", b"", "X-Devnode-Fail-Status: 429").status == 429
    client = sent(node, "POST", "/v1/chat/completions?devnode_tokens=2&devnode_tps=1000", STREAM)
    node.clock.advance(1)
    assert len(stream_events(client.response())) == 4  # 2 tokens, the final chunk, [DONE]
    bad = ask(node, "GET", "/v1/models?devnode_tps=fast")
    assert bad.status == 400 and "tps" in bad.json()["error"]["message"]
    assert node.config == DevNodeConfig(ttft_ms=0)


def test_slow_health_and_its_status():
    node = make_node(health_delay_ms=500, health_status=503)
    client = sent(node, "GET", "/health")
    node.clock.advance(0.499)
    assert client.transport.value() == b""
    node.clock.advance(0.001)
    assert client.response().status == 503
    assert client.response().json() == {"status": "unhealthy", "node": "devnode", "model_ready": False}


def test_slow_health_timer_dies_with_the_client():
    node = make_node(health_delay_ms=500)
    client = sent(node, "GET", "/health")
    client.leave()
    assert node.clock.getDelayedCalls() == []


def test_unknown_path_and_wrong_method_are_json_errors():
    node = make_node()
    missing = ask(node, "GET", "/v2/nothing")
    assert (missing.status, missing.json()["error"]["code"]) == (404, "not_found")
    wrong = ask(node, "GET", "/v1/chat/completions")
    assert (wrong.status, wrong.header("allow")) == (405, ["POST"])
    assert ask(node, "HEAD", "/ws/echo").status == 405


def test_head_is_answered_like_get_without_a_body():
    client = Client(make_node())
    client.send("HEAD", "/v1/models")
    head, _, body = client.transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: application/json" in head and body == b""


def test_echo_is_byte_exact_and_keeps_header_order():
    node = make_node()
    echoed = ask(
        node,
        "PUT",
        "/_devnode/echo/a%2Fb?x=%2F&y",
        b"\x00\xffbody",
        "x-rep: 1",
        "Accept: */*",
        "X-Rep: 2",
        "X-Devnode-Set-Header: Set-Cookie: a=1",
        "X-Devnode-Set-Header: Set-Cookie: b=2",
    )
    assert echoed.header("set-cookie") == ["a=1", "b=2"]
    data = echoed.json()
    assert (data["method"], data["uri"], data["client"]) == (
        "PUT",
        "/_devnode/echo/a%2Fb?x=%2F&y",
        "127.0.0.1",
    )
    assert (data["body"].encode("latin-1"), data["body_length"]) == (b"\x00\xffbody", 6)
    assert [name.lower() for name, _ in data["headers"][1:4]] == ["x-rep", "accept", "x-rep"]
    assert [value for name, value in data["headers"] if name.lower() == "x-rep"] == ["1", "2"]


def test_echo_rejects_a_malformed_set_header():
    assert ask(make_node(), "GET", "/_devnode/echo", b"", "X-Devnode-Set-Header: no colon").status == 400


def settled(stub: StubTreq, deferred: Deferred) -> object:
    """The result of a StubTreq Deferred, once the in-memory exchange has run."""
    stub.flush()
    results = []
    deferred.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def test_resource_under_another_site_reports_headers_grouped():
    node = make_node()
    stub = StubTreq(node.resource())
    response = settled(stub, stub.get("http://devnode/_devnode/echo", headers={"X-A": ["1", "2"]}))
    assert response.code == 200
    data = json.loads(settled(stub, response.content()))
    assert [value for name, value in data["headers"] if name == "X-A"] == ["1", "2"]


def test_config_endpoint_changes_the_node():
    node = make_node()
    changed = ask(node, "POST", "/_devnode/config", b'{"health_status": 503, "models": ["x", "y"]}')
    assert changed.status == 200 and changed.json()["health_status"] == 503
    assert node.config == DevNodeConfig(health_status=503, models=("x", "y"))
    assert ask(node, "GET", "/_devnode/config").json()["models"] == ["x", "y"]
    for bad in (b'{"bogus": 1}', b'{"health_status": "503"}', b"[1]", b"{"):
        answer = ask(node, "POST", "/_devnode/config", bad)
        assert answer.status == 400 and answer.json()["error"]["code"] in ("invalid_config", "invalid_json")
    assert node.config.health_status == 503


def test_stats_count_requests_and_remember_the_last_inference_one():
    node = make_node()
    ask(node, "GET", "/v1/models", b"", "X-Trace: 1")
    stats = ask(node, "GET", "/_devnode/stats").json()
    assert stats["requests"] == 2
    assert stats["by_path"] == {"/v1/models": 1, "/_devnode/stats": 1}
    assert stats["last_request"]["uri"] == "/v1/models"
    assert ["X-Trace", "1"] in stats["last_request"]["headers"]


def test_disconnect_all_waits_for_every_connection():
    node = make_node(hang=True)
    clients = [Client(node) for _ in range(2)]
    clients[0].send("GET", "/v1/models")
    assert node.stats.open_connections == 2
    done = node.disconnect_all()
    assert all(client.transport.disconnected for client in clients) and not done.called
    clients[0].leave()
    assert not done.called
    clients[1].leave()
    assert done.called and node.stats.open_connections == 0 and node.stats.hanging == 0
    assert node.disconnect_all().called


def test_configure_validates_and_keeps_the_old_config_on_error():
    node = make_node()
    assert node.configure(tokens_per_second=5).tokens_per_second == 5
    for bad in ({"tokens_per_second": 0}, {"speed": 1}):
        with pytest.raises((TypeError, ValueError)):
            node.configure(**bad)
    assert node.config == DevNodeConfig(tokens_per_second=5)


# --- twistd plugin ------------------------------------------------------------------------------


def parse_options(*argv: str) -> devnode_tap.Options:
    options = devnode_tap.Options()
    options.parseOptions(list(argv))
    return options


def test_options_default_to_the_config_defaults():
    assert parse_options()["config"] == DevNodeConfig()


def test_options_build_the_config():
    options = parse_options(
        "--models",
        "a,b",
        "--tps",
        "20",
        "--ttft-ms",
        "5",
        "--tokens",
        "9",
        "--fail-status",
        "502",
        "--close-after",
        "3",
        "--hang",
        "--health-status",
        "503",
        "--health-delay-ms",
        "10",
        "--name",
        "n1",
    )
    assert options["config"] == DevNodeConfig(
        name="n1",
        models=("a", "b"),
        tokens_per_second=20.0,
        ttft_ms=5.0,
        max_tokens=9,
        fail_status=502,
        close_after=3,
        hang=True,
        health_status=503,
        health_delay_ms=10.0,
    )


@pytest.mark.parametrize(
    "option, value",
    [
        ("--tps", "0"),
        ("--tps", "x"),
        ("--tokens", "1.5"),
        ("--fail-status", "200"),
        ("--models", ""),
        ("--health-status", "99"),
        ("--port", "nonsense:1"),
        ("--port", "tcp:http"),
    ],
)
def test_bad_option_values_name_option_and_value(option, value):
    with pytest.raises(usage.UsageError) as caught:
        parse_options(option, value)
    assert option in str(caught.value) and repr(value) in str(caught.value)


def test_make_service_listens_with_the_node_site():
    reactor = MemoryReactorClock()
    service = devnode_tap.makeService(parse_options("--port", "tcp:8123:interface=127.0.0.1"), reactor)
    service.startService()
    try:
        [(port, factory, _, interface)] = reactor.tcpServers
        assert (port, interface) == (8123, "127.0.0.1")
        assert isinstance(factory, DevNodeSite)
        assert service.getServiceNamed("devnode-http").running
    finally:
        service.stopService()
