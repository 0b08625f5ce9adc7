"""Property tests of the upstream HTTP/1.1 parser: total on any bytes, the same however they arrive."""

from hypothesis import given, settings
from hypothesis import strategies as st

from blyanproxy.upstream.http11 import (
    ChunkedBody,
    ProtocolError,
    body_framing,
    keeps_alive,
    parse_head,
)

#: Bytes that look like HTTP often enough to reach the deeper branches.
http_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 ", b"200", b" OK", b"\r\n", b"\n", b"\r", b":", b" ", b"\t",
                         b"Content-Length", b"Transfer-Encoding", b"chunked", b"0", b"5", b"ff", b";x=1", b"\x00",
                         b"\x7f", b"\xff", b"abcde", b"-1", b"+5", b"0x5", b"Connection", b"close"]),
        st.binary(max_size=6),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=500)
@given(http_bytes)
def test_parse_head_is_total_and_lets_nothing_unsafe_through(head):
    try:
        status, reason, headers = parse_head(head)
    except ProtocolError:
        return
    assert 100 <= status <= 599
    assert not any(c in reason for c in b"\r\n\x00")
    for name, values in headers:
        assert name and not any(c in name for c in b" \t\r\n:\x00")
        for value in values:
            assert not any(c in value for c in b"\r\n\x00")
            assert value == value.strip()


@given(st.sampled_from([b"GET", b"HEAD", b"POST"]), st.integers(100, 599),
       st.lists(st.tuples(st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"content-length", b"X"]),
                          st.lists(http_bytes, min_size=1, max_size=2)), max_size=3))
def test_body_framing_is_total(method, status, headers):
    try:
        framing, length = body_framing(method, status, b"HTTP/1.1", headers)
    except ProtocolError:
        return
    assert framing in ("none", "length", "chunked", "close")
    assert (length is None) == (framing in ("chunked", "close"))
    assert length is None or length >= 0
    assert isinstance(keeps_alive(b"HTTP/1.1", headers), bool)


def run_chunked(data, cuts, decode):
    """Feed ``data`` cut at ``cuts``: ('error'|'end'|'more', decoded or re-framed bytes, bytes after the end)."""
    body, pieces, position = ChunkedBody(), [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        piece = data[position:cut]
        if not piece:
            continue
        try:
            end = body.feed(piece, pieces, framed=not decode)
        except ProtocolError:
            return "error", None, None
        if end != -1:
            return "end", b"".join(pieces), data[position + end:]
        position = cut
    return "more", b"".join(pieces), b""


@settings(max_examples=500)
@given(http_bytes, st.lists(st.integers(0, 200), max_size=8), st.booleans())
def test_chunked_framing_is_total_and_independent_of_how_bytes_arrive(data, cuts, decode):
    """Any bytes, in any pieces, give the same verdict as in one piece, and only ProtocolError."""
    whole = run_chunked(data, [], decode)
    split = run_chunked(data, cuts, decode)
    assert split == whole


@settings(max_examples=300)
@given(http_bytes)
def test_a_re_framed_body_is_clean_chunked_framing_of_the_same_data(data):
    status, framed, _ = run_chunked(data, [], decode=False)
    if status != "end":
        return
    assert run_chunked(framed, [], decode=True)[1] == run_chunked(data, [], decode=True)[1]
    assert run_chunked(framed, [], decode=False) == ("end", framed, b"")  # re-framing is idempotent
    lines = framed.split(b"\r\n")
    assert framed.endswith(b"0\r\n\r\n") and not any(b";" in line for line in lines[::2] if len(line) < 17)
