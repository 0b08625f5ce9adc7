"""Property tests of header filtering: what reaches a node and a client, whatever a client sends."""

from hypothesis import given, settings
from hypothesis import strategies as st

from blyanproxy.core.headers import (
    ClientFacts,
    downstream_response_headers,
    unfit_request_headers,
    upstream_request_headers,
)
from blyanproxy.upstream.http11 import serialize_request_head

HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
       b"content-length", b"host"}
FORWARDING = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
                min_size=1, max_size=12).map(str.encode)
header_name = st.one_of(token, st.sampled_from(
    [b"Connection", b"connection", b"Host", b"HOST", b"Transfer-Encoding", b"Content-Length", b"Proxy-Authorization",
     b"proxy-connection", b"X-Forwarded-For", b"X-Forwarded-Host", b"Forwarded", b"X-Real-IP", b"Upgrade", b"TE",
     b"Keep-Alive", b"X-Blyan-Node", b"X-Evil", b"Trailer", b"X-Admin-Token", b"X_Forwarded_For", b"x_real_ip"]))
#: Values as Twisted hands them over: no CR, LF or NUL, trimmed.
header_value = st.one_of(
    st.binary(max_size=12).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip()),
    st.sampled_from([b"close, X-Evil", b"keep-alive", b"x-forwarded-for, Host", b"evil.example.com", b"chunked"]),
)
headers = st.lists(st.tuples(header_name, st.lists(header_value, min_size=1, max_size=3)), max_size=10)
client = st.builds(ClientFacts, address=st.sampled_from(["203.0.113.7", "::1", "unknown"]),
                   scheme=st.sampled_from([b"http", b"https"]), host=st.one_of(st.none(), header_value))


def listed_in_connection(incoming):
    return {t.strip().lower() for n, vs in incoming if n.lower() == b"connection"
            for v in vs for t in v.split(b",") if t.strip()}


@settings(max_examples=400)
@given(headers, client, st.booleans(), st.booleans(), st.booleans())
def test_upstream_headers_carry_only_what_the_proxy_intends(incoming, facts, trust, strip_origin, websocket):
    out = upstream_request_headers(incoming, b"10.0.0.1:8000", facts, trust_forwarded=trust,
                                   strip_origin=strip_origin, websocket=websocket)
    names = [name.lower() for name, _ in out]
    assert out[0] == (b"Host", [b"10.0.0.1:8000"]) and names.count(b"host") == 1
    connection_listed = listed_in_connection(incoming)
    for name, values in out[1:]:
        lowered = name.lower()
        if websocket and lowered in (b"connection", b"upgrade"):
            assert values in ([b"Upgrade"], [b"websocket"])
            continue
        assert lowered not in HOP and not lowered.startswith(b"proxy-")
        assert lowered not in connection_listed or lowered in FORWARDING
    assert b"x-admin-token" not in names and not any(b"_" in name for name in names)
    assert not unfit_request_headers(out)
    assert names.count(b"x-forwarded-for") == 1 and names.count(b"x-forwarded-proto") == 1
    assert names.count(b"x-forwarded-host") <= 1
    forwarded_for = dict(out)[b"X-Forwarded-For"][0]
    assert forwarded_for.endswith(facts.address.encode())
    if not trust:
        assert forwarded_for == facts.address.encode()
        assert not ({b"forwarded", b"x-real-ip"} & set(names))
        assert dict(out)[b"X-Forwarded-Proto"] == [facts.scheme]
    # Every end-to-end header the client sent arrives, values and order kept.
    dropped = HOP | connection_listed | FORWARDING | {b"x-admin-token"} | ({b"origin"} if strip_origin else set())
    dropped |= {name.lower() for name in unfit_request_headers(incoming)}
    kept = [(n, vs) for n, vs in incoming
            if n.lower() not in dropped and not n.lower().startswith(b"proxy-") and b"_" not in n]
    assert [pair for pair in out if pair[0].lower() not in FORWARDING | {b"host", b"connection", b"upgrade"}] == [
        pair for pair in kept if pair[0].lower() not in {b"connection", b"upgrade"}]
    # Serialised, it is one request head: a blank line only at its end.
    head = serialize_request_head(b"GET", b"/x", out)
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1 and b"\n" not in head.replace(b"\r\n", b"")


@settings(max_examples=300)
@given(headers)
def test_downstream_headers_drop_hop_by_hop_and_forged_proxy_headers(upstream):
    out = downstream_response_headers(upstream)
    listed = listed_in_connection(upstream)
    for name, _ in out:
        lowered = name.lower()
        assert lowered not in HOP | listed | {b"x-blyan-node", b"x-blyan-attempts"}
        assert not lowered.startswith(b"proxy-")
    assert len(out) == len([n for n, _ in upstream
                            if n.lower() not in HOP | listed | {b"x-blyan-node", b"x-blyan-attempts"}
                            and not n.lower().startswith(b"proxy-")])
