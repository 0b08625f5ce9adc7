"""Header hygiene in both directions."""

from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.core.headers import (
    ClientFacts,
    downstream_response_headers,
    upstream_request_headers,
)

CLIENT = ClientFacts(address="203.0.113.7", scheme=b"http", host=b"proxy.example.com")


def as_dict(pairs):
    out = {}
    for name, values in pairs:
        out.setdefault(name.lower(), []).extend(values)
    return out


def test_hop_by_hop_removed_and_repeats_kept():
    incoming = [
        (b"Connection", [b"keep-alive, X-Hop"]),
        (b"Keep-Alive", [b"timeout=5"]),
        (b"Te", [b"trailers"]),
        (b"Trailer", [b"X-Sum"]),
        (b"Transfer-Encoding", [b"chunked"]),
        (b"Upgrade", [b"h2c"]),
        (b"Proxy-Authorization", [b"Basic eA=="]),
        (b"Proxy-Connection", [b"keep-alive"]),
        (b"X-Hop", [b"1"]),
        (b"Content-Length", [b"12"]),
        (b"Host", [b"proxy.example.com"]),
        (b"X-Multi", [b"a", b"b"]),
        (b"Authorization", [b"Bearer key"]),
        (b"Content-Type", [b"application/json"]),
    ]
    out = as_dict(upstream_request_headers(incoming, b"node:8000", CLIENT))
    for gone in (b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                 b"proxy-authorization", b"proxy-connection", b"x-hop", b"content-length"):
        assert gone not in out
    assert out[b"host"] == [b"node:8000"]
    assert out[b"x-multi"] == [b"a", b"b"]
    assert out[b"authorization"] == [b"Bearer key"]
    assert out[b"x-forwarded-for"] == [b"203.0.113.7"]
    assert out[b"x-forwarded-proto"] == [b"http"]
    assert out[b"x-forwarded-host"] == [b"proxy.example.com"]


def test_untrusted_forwarding_headers_are_replaced():
    incoming = [(b"X-Forwarded-For", [b"1.2.3.4"]), (b"X-Forwarded-Proto", [b"https"]),
                (b"X-Forwarded-Host", [b"evil"]), (b"Forwarded", [b"for=1.2.3.4"]), (b"X-Real-Ip", [b"1.2.3.4"])]
    out = as_dict(upstream_request_headers(incoming, b"node", CLIENT))
    assert out[b"x-forwarded-for"] == [b"203.0.113.7"]
    assert out[b"x-forwarded-proto"] == [b"http"]
    assert out[b"x-forwarded-host"] == [b"proxy.example.com"]
    assert b"forwarded" not in out and b"x-real-ip" not in out


def test_trusted_forwarding_headers_are_extended():
    incoming = [(b"X-Forwarded-For", [b"1.2.3.4, 5.6.7.8"]), (b"X-Forwarded-Proto", [b"https"]),
                (b"X-Forwarded-Host", [b"chat.example.com"]), (b"X-Real-Ip", [b"1.2.3.4"])]
    out = as_dict(upstream_request_headers(incoming, b"node", CLIENT, trust_forwarded=True))
    assert out[b"x-forwarded-for"] == [b"1.2.3.4, 5.6.7.8, 203.0.113.7"]
    assert out[b"x-forwarded-proto"] == [b"https"]
    assert out[b"x-forwarded-host"] == [b"chat.example.com"]
    assert out[b"x-real-ip"] == [b"1.2.3.4"]


def test_origin_stripped_only_when_asked():
    incoming = [(b"Origin", [b"https://app.example.com"])]
    assert b"origin" in as_dict(upstream_request_headers(incoming, b"n", CLIENT))
    assert b"origin" not in as_dict(upstream_request_headers(incoming, b"n", CLIENT, strip_origin=True))


def test_websocket_keeps_upgrade():
    incoming = [(b"Connection", [b"Upgrade"]), (b"Upgrade", [b"websocket"]),
                (b"Sec-Websocket-Key", [b"dGhlIHNhbXBsZSBub25jZQ=="])]
    out = as_dict(upstream_request_headers(incoming, b"n", CLIENT, websocket=True))
    assert out[b"connection"] == [b"Upgrade"]
    assert out[b"upgrade"] == [b"websocket"]
    assert out[b"sec-websocket-key"] == [b"dGhlIHNhbXBsZSBub25jZQ=="]


def test_response_headers():
    upstream = [(b"Set-Cookie", [b"a=1", b"b=2"]), (b"Connection", [b"X-Private"]), (b"X-Private", [b"x"]),
                (b"Proxy-Authenticate", [b"Basic"]), (b"X-Blyan-Node", [b"forged"]), (b"Content-Type", [b"text/plain"])]
    out = as_dict(downstream_response_headers(upstream))
    assert out == {b"set-cookie": [b"a=1", b"b=2"], b"content-type": [b"text/plain"]}


header_name = st.sampled_from([b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Transfer-Encoding",
                               b"Upgrade", b"Proxy-Foo", b"Content-Length", b"Host", b"X-A", b"Accept"])


@given(st.lists(
    st.tuples(header_name, st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=3)), max_size=8,
))
def test_no_hop_by_hop_header_ever_leaves(incoming):
    out = as_dict(upstream_request_headers(incoming, b"node", CLIENT))
    for name in (b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length"):
        assert name not in out
    assert not any(name.startswith(b"proxy-") for name in out)
    assert out[b"host"] == [b"node"]


def test_the_admin_token_and_underscore_spellings_never_reach_a_node():
    incoming = [
        (b"X-Admin-Token", [b"t" * 32]),
        (b"X_forwarded_for", [b"6.6.6.6"]),  # WSGI servers read it as X-Forwarded-For
        (b"X_Real_IP", [b"6.6.6.6"]),
        (b"Content_Type", [b"text/plain"]),
        (b"X-Kept", [b"1"]),
    ]
    out = as_dict(upstream_request_headers(incoming, b"node:8000", CLIENT, trust_forwarded=True))
    assert b"x-admin-token" not in out
    assert not [name for name in out if b"_" in name]
    assert out[b"x-kept"] == [b"1"]
    assert out[b"x-forwarded-for"] == [b"203.0.113.7"]


def test_a_header_with_a_control_character_never_reaches_a_node():
    for control in (b"\x0b", b"\x0c", b"\x1b", b"\x7f", b"\x01"):
        incoming = [(b"X-Evil", [b"a" + control + b"b"]), (b"X-Split", [b"ok", b"x" + control]), (b"X-Ok", [b"a\tb"])]
        out = as_dict(upstream_request_headers(incoming, b"node:8000", CLIENT))
        assert b"x-evil" not in out and b"x-split" not in out
        assert out[b"x-ok"] == [b"a\tb"]  # a tab is allowed inside a value


def test_headers_unfit_for_a_node_are_named():
    from blyanproxy.core.headers import unfit_request_headers

    assert unfit_request_headers([(b"X-A", [b"1"]), (b"X-B", [b"\x1b[31m"]), (b"X-C", [b"ok", b"\x7f"])]) == [
        b"X-B", b"X-C"]
    assert unfit_request_headers([(b"X-A", [b"caf\xc3\xa9\t1"])]) == []
