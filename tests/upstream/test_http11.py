"""Pure HTTP/1.1 handling of node responses: heads, framing and chunked bodies."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.upstream.http11 import (
    ChunkedBody,
    ProtocolError,
    body_framing,
    parse_head,
    serialize_request_head,
)


def test_serialize_request_head():
    head = serialize_request_head(b"POST", b"/a%2Fb?q", [(b"Host", [b"n:1"]), (b"X-M", [b"1", b"2"])])
    assert head == b"POST /a%2Fb?q HTTP/1.1\r\nHost: n:1\r\nX-M: 1\r\nX-M: 2\r\n\r\n"


def test_parse_head_groups_repeats():
    status, reason, headers = parse_head(b"HTTP/1.1 200 OK\r\nSet-Cookie: a\r\nX: 1\r\nset-cookie: b")
    assert (status, reason) == (200, b"OK")
    assert headers == [(b"Set-Cookie", [b"a", b"b"]), (b"X", [b"1"])]


@pytest.mark.parametrize("head", [b"HTTP/2 200", b"nonsense", b"HTTP/1.1 abc", b"HTTP/1.1 200 OK\r\nNoColon",
                                  b"HTTP/1.1 200 OK\r\nX: 1\r\n folded", b"HTTP/1.1 200 OK\r\nBad : 1"])
def test_parse_head_refuses_malformed(head):
    with pytest.raises(ProtocolError):
        parse_head(head)


@pytest.mark.parametrize(
    "method, status, headers, expected",
    [
        (b"HEAD", 200, [(b"Content-Length", [b"10"])], ("none", 0)),
        (b"GET", 204, [], ("none", 0)),
        (b"GET", 304, [(b"Content-Length", [b"10"])], ("none", 0)),
        (b"GET", 200, [(b"Transfer-Encoding", [b"chunked"]), (b"Content-Length", [b"3"])], ("chunked", None)),
        (b"GET", 200, [(b"Transfer-Encoding", [b"gzip"])], ("close", None)),
        (b"GET", 200, [(b"Content-Length", [b"10", b"10"])], ("length", 10)),
        (b"GET", 200, [], ("close", None)),
    ],
)
def test_body_framing(method, status, headers, expected):
    assert body_framing(method, status, b"HTTP/1.1", headers) == expected


@pytest.mark.parametrize("values", [[b"10", b"11"], [b"-1"], [b"1e3"]])
def test_bad_content_length_is_a_protocol_error(values):
    with pytest.raises(ProtocolError):
        body_framing(b"GET", 200, b"HTTP/1.1", [(b"Content-Length", values)])


def feed_in_pieces(encoded, cuts, decode):
    """Feed ``encoded`` cut into pieces; returns (decoded data or the re-framed body, end found, what follows)."""
    body, collected, position = ChunkedBody(), [], 0
    for cut in cuts + [len(encoded)]:
        piece = encoded[position:position + cut]
        end = body.feed(piece, collected, framed=not decode)
        if end != -1:
            return b"".join(collected), True, piece[end:] + encoded[position + len(piece):]
        position += len(piece)
    return b"".join(collected), False, b""


chunk_lists = st.lists(st.binary(min_size=1, max_size=50), max_size=6)
cut_lists = st.lists(st.integers(1, 40), max_size=20)


def encode(chunks, extension=b"", trailers=b"X-T: 1\r\n"):
    return b"".join(b"%x%s\r\n%s\r\n" % (len(c), extension, c) for c in chunks) + b"0%s\r\n%s\r\n" % (
        extension, trailers)


@given(chunk_lists, cut_lists)
def test_chunked_body_decodes_any_split(chunks, cuts):
    data, done, rest = feed_in_pieces(encode(chunks, b";ext=1") + b"NEXT", cuts, decode=True)
    assert done and data == b"".join(chunks) and rest == b"NEXT"


@given(chunk_lists, cut_lists)
def test_chunked_body_keeps_clean_framing_as_it_is(chunks, cuts):
    encoded = encode(chunks, trailers=b"")
    raw, done, rest = feed_in_pieces(encoded + b"NEXT", cuts, decode=False)
    assert done and raw == encoded and rest == b"NEXT"


EXTENSIONS = [b";ext=1", b';ext="a\rb"', b";a;b=c", b' ;x="\x01"', b";\x1b[31m"]
TRAILERS = [b"X-T: 1\r\n", b"X-Bad: \x01\r\n", b"Set-Cookie: a=1\r\nX-Evil\x7f: 2\r\n", b"no colon at all\r\n"]


@given(chunk_lists, cut_lists, st.sampled_from(EXTENSIONS), st.sampled_from(TRAILERS))
def test_chunk_extensions_and_trailers_never_pass(chunks, cuts, extension, trailers):
    """Re-framed, a node's chunked body keeps its chunks but loses every extension and trailer."""
    raw, done, rest = feed_in_pieces(encode(chunks, extension, trailers) + b"NEXT", cuts, decode=False)
    assert done and raw == encode(chunks, trailers=b"") and rest == b"NEXT"


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-5\r\nabc", b"5\r\nabcdeXX", b"0x5\r\n", b"1_0\r\n",
                                 b"5\nabcde", b"+5\r\n"])
def test_chunked_body_refuses_malformed(bad):
    with pytest.raises(ProtocolError):
        ChunkedBody().feed(bad, [])


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX Bad: 1",
        b"HTTP/1.1 200 OK\nSet-Cookie: injected=1",
        b"HTTP/1.1 200 OK\r\nX-A: one\ntwo",
        b"HTTP/1.1 200 OK\r\nX-A: nul\x00",
        b"HTTP/1.1 999 Nope",
    ],
)
def test_heads_that_could_inject_or_break_client_headers_are_refused(head):
    with pytest.raises(ProtocolError):
        parse_head(head)
