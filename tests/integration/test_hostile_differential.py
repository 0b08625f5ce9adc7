"""A differential check of what the proxy forwards: a strict, independent HTTP/1.1 parser (h11) reads
the bytes a recording node received, and they must mean exactly what the proxy was meant to send.

Requests are generated (hypothesis, a bounded number of examples) with the shapes clients send:
methods, targets with escapes, repeated and odd-but-valid header values, headers the proxy must
drop (hop-by-hop, ``Proxy-*``, underscore spellings, its own token), bodies framed by length or
chunked. Each goes through the proxy on a connection of its own; its ``X-Example`` header finds it
again at the node. The expectation is written here from the rules, not computed by the proxy's code.
"""

from __future__ import annotations

import h11
import pytest_twisted
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from .rawhttp import connect, sleep

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^`|~"
#: Bytes a header value may hold inside (RFC 9110 field-vchar and obs-text, with spaces and tabs between).
VALUE_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
#: Path bytes that need no escaping (RFC 3986 pchar), and some escapes.
PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._~!$'()*+,;=:@"

#: Names the proxy or this test gives a meaning of their own: never generated as end-to-end headers.
RESERVED = {b"x-example", b"x-hop", b"x-admin-token", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
            b"x-real-ip", b"x-request-id"}  # the proxy sets its own X-Request-Id
end_to_end_names = (st.text(TOKEN_CHARS, min_size=1, max_size=10).map(lambda name: ("X-" + name).encode())
                    .filter(lambda name: name.lower() not in RESERVED))
values = st.builds(
    lambda first, middle, last: first + middle + last,
    st.binary(min_size=1, max_size=1).filter(lambda b: b[0] in VALUE_BYTES),
    st.lists(st.sampled_from([b" ", b"\t"] + [bytes([c]) for c in VALUE_BYTES]), max_size=12).map(b"".join),
    st.binary(min_size=0, max_size=1).filter(lambda b: not b or b[0] in VALUE_BYTES),
)
segments = st.one_of(
    st.text(PATH_CHARS, min_size=1, max_size=8).filter(lambda s: s.split(";")[0].strip(".") != ""),  # no dot segment
    st.sampled_from(["%2F", "%20", "%E2%80%A8", "%25", "caf%C3%A9", "a%3Fb"]),
)
query_parameters = st.lists(
    st.tuples(st.text("abcdefghij", min_size=1, max_size=5).map(lambda name: "q" + name),
              st.text(PATH_CHARS + "/?", max_size=8)),
    max_size=3,
)
#: Headers a client may send that must never reach a node.
DROPPED = [
    (b"X-Hop", b"1"),  # listed in the request's Connection header (``raw_request``)
    (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
    (b"Proxy-Authorization", b"Basic eA=="), (b"X_Forwarded_For", b"6.6.6.6"), (b"X-Admin-Token", b"t" * 32),
    (b"X-Forwarded-Host", b"evil.example.com"), (b"Forwarded", b"for=6.6.6.6"), (b"Upgrade", b"h2c"),
]


@st.composite
def client_requests(draw):
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"]))
    path = "/v1/" + "/".join(draw(st.lists(segments, min_size=1, max_size=4)))
    query = "&".join(f"{name}={value}" for name, value in draw(query_parameters))
    target = (path + ("?" + query if query else "")).encode()
    headers = draw(st.lists(st.tuples(end_to_end_names, values), max_size=6))
    dropped = draw(st.lists(st.sampled_from(DROPPED), max_size=3, unique=True))
    body = draw(st.binary(max_size=300)) if method in (b"POST", b"PUT", b"PATCH") else b""
    chunked = bool(body) and draw(st.booleans())
    return method, target, headers, dropped, body, chunked


def raw_request(number, method, target, headers, dropped, body, chunked):
    """The raw request (its ``Connection`` header lists ``X-Hop``)."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: proxy.example", b"X-Example: %d" % number,
             b"Connection: X-Hop"]
    lines += [name + b": " + value for name, value in headers + dropped]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:100], body[100:]) if piece)
        framed += b"0\r\n\r\n"
    else:
        if body or method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"Content-Length: %d" % len(body))
        framed = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + framed


def parsed_requests(stream):
    """Every request in one connection's bytes, read by h11: ``[(method, target, headers, body)]``.

    h11 raises ``RemoteProtocolError`` on anything that is not clean HTTP/1.1.
    """
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(stream)
    requests = []
    while True:
        head = connection.next_event()
        if head is h11.NEED_DATA:
            assert connection.their_state is h11.IDLE, "a request reached the node incomplete"
            return requests
        assert isinstance(head, h11.Request), head
        body = b""
        while True:
            event = connection.next_event()
            assert event is not h11.NEED_DATA, "a request body reached the node incomplete"
            if isinstance(event, h11.EndOfMessage):
                break
            body += event.data
        requests.append((head.method, head.target, list(head.headers), body))
        connection.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
        connection.send(h11.EndOfMessage())
        connection.start_next_cycle()


def grouped(headers):
    """``{lower-case name: [values in order]}``."""
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out


def expected_at_node(node_netloc, method, target, headers, body):
    """What the proxy is meant to send for a request from 127.0.0.1 (TRUST_FORWARDED off)."""
    expected = grouped((name, value.strip(b" \t")) for name, value in headers)
    expected[b"host"] = [node_netloc]
    expected[b"x-example"] = None  # checked by the caller
    expected[b"x-forwarded-for"] = [b"127.0.0.1"]
    expected[b"x-forwarded-proto"] = [b"http"]
    expected[b"x-forwarded-host"] = [b"proxy.example"]
    if body or method in (b"POST", b"PUT", b"PATCH"):
        expected[b"content-length"] = [b"%d" % len(body)]
    return expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(client_requests(), min_size=1, max_size=3))
@pytest_twisted.ensureDeferred
async def test_what_the_proxy_forwards_means_the_same_to_h11(reactor, capture_node, proxy_factory, requests):
    node = capture_node()
    netloc = node.url.removeprefix("http://").encode()
    proxy = await proxy_factory([node.url])
    try:
        for number, (method, target, headers, dropped, body, chunked) in enumerate(requests):
            await exchange(reactor, proxy, raw_request(number, method, target, headers, dropped, body, chunked))
    finally:
        await proxy.stop()
        await node.stop()
    at_node = [request for stream in node.received for request in parsed_requests(stream)]
    assert len(at_node) == len(requests)
    by_example = {int(grouped(h)[b"x-example"][0]): (m, t, h, b) for m, t, h, b in at_node}
    for number, (method, target, headers, _, body, _) in enumerate(requests):
        got_method, got_target, got_headers, got_body = by_example[number]
        assert (got_method, got_target, got_body) == (method, target, body)
        got = grouped(got_headers)
        expected = expected_at_node(netloc, method, target, headers, body)
        assert got.pop(b"x-example") == [b"%d" % number]
        expected.pop(b"x-example")
        [request_id] = got.pop(b"x-request-id")  # the proxy's own id for the request, one per request
        assert len(request_id) == 32 and b"x-request-id" not in expected
        assert got == expected


async def exchange(reactor, proxy, raw):
    """Send one request on a connection of its own and read its whole answer (the node's 404), with h11."""
    client = await connect(reactor, proxy.url)
    note(f"request: {raw!r}")
    client.transport.write(raw)
    answer = h11.Connection(h11.CLIENT)
    answer.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))  # sets its reader's state
    answer.send(h11.EndOfMessage())
    fed = 0
    for _ in range(1000):  # 10 s at most
        if len(client.received) > fed:  # (empty data would mean the connection closed, to h11)
            answer.receive_data(client.received[fed:])
            fed = len(client.received)
        event = answer.next_event()
        while event is not h11.NEED_DATA and not isinstance(event, h11.EndOfMessage):
            event = answer.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        await sleep(reactor, 0.01)
    else:
        raise AssertionError(f"no whole answer: {client.received!r}")
    client.transport.loseConnection()
