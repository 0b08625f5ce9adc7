"""Property tests of path routing: total on any target, never an address, ``?api=`` only picks a node."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blyanproxy.core.errors import ProxyError
from blyanproxy.core.nodes import Node
from blyanproxy.core.routing import parse_route, route_allows, take_node_parameter

targets = st.lists(
    st.one_of(
        st.sampled_from([b"/", b"//", b"/api", b"api", b"?", b"&", b"=", b"%61pi", b"%2F", b"http://", b"https://",
                         b"evil.example.com", b":80", b"@", b"#", b"_admin", b"target=", b"api=", b"+", b"%", b"\\",
                         b"%5F", b"%5f", b"_ADMIN", b";", b"%20", b"%2e", b".", b"..", b"%25", b"tags/all/", b"0/"]),
        st.binary(max_size=4),
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=500)
@given(targets)
def test_parse_route_is_total_and_only_ever_yields_a_path(target):
    try:
        route = parse_route(target)
    except ProxyError as err:
        assert err.status in (400, 404)
        return
    upstream = route.upstream_target
    assert upstream.startswith(b"/")
    path = upstream.split(b"?", 1)[0]
    assert path.split(b"/", 2)[1] != b"_admin"
    # The node parameter never travels on, in any spelling.
    assert take_node_parameter(upstream) == (upstream, None)


@given(targets)
def test_absolute_form_never_lets_the_authority_through(rest):
    try:
        route = parse_route(b"http://evil.example.com:1" + b"/" + rest)
    except ProxyError:
        return
    assert not route.upstream_target.startswith(b"http")


@pytest.mark.parametrize(
    "target, upstream, node",
    [
        (b"/v1/models?api=gpu-a", b"/v1/models", "gpu-a"),
        (b"/api/chat?x=1&api=gpu%20a&y=%2F", b"/chat?x=1&y=%2F", "gpu a"),
        (b"/chat?%61pi=gpu+a", b"/chat", "gpu a"),
        (b"/chat?apix=1&xapi=2", b"/chat?apix=1&xapi=2", None),
        (b"/chat?target=http://evil/", b"/chat?target=http://evil/", None),
    ],
)
def test_node_parameter(target, upstream, node):
    route = parse_route(target)
    assert (route.upstream_target, route.node) == (upstream, node)


@pytest.mark.parametrize("target", [b"/x?api=", b"/x?api=a&api=b", b"/x?api"])
def test_empty_or_repeated_node_choice_is_400(target):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert raised.value.status == 400


NODES = [Node(id="0123456789abcdef", name="gpu-a", base_url="http://10.0.0.1:8000"),
         Node(id="fedcba9876543210", name="gpu-b", base_url="http://10.0.0.2:8000")]


@given(st.text(max_size=20))
def test_a_node_choice_matches_only_an_exact_id_or_name(value):
    route = parse_route(b"/x?api=" + value.encode("utf-8").replace(b"%", b"%25").replace(b"&", b"%26")
                        .replace(b"+", b"%2B").replace(b"#", b"%23")) if value else None
    if route is None:
        return
    allowed = [node for node in NODES if route_allows(route, node)]
    assert allowed == [node for node in NODES if value in (node.id, node.name)]


def _spelled(text: bytes, draw) -> bytes:
    """``text`` as a client may spell it: each character in either case, perhaps percent-encoded
    once or twice (``%5F``, ``%255f``)."""
    out = b""
    for byte in text:
        char = bytes([byte])
        char = draw(st.sampled_from([char.lower(), char.upper()]))
        encoding = draw(st.integers(0, 2))
        if encoding:
            char = b"%%%02X" % byte if draw(st.booleans()) else b"%%%02x" % byte
            if encoding == 2:
                char = b"%25" + char[1:]
        out += char
    return out


@st.composite
def admin_spellings(draw):
    """A target whose path names /_admin behind /api, a tag, an index or an absolute form."""
    prefix = draw(st.sampled_from([b"/", b"//", b"/api/", b"/api//", b"/0/", b"/12/", b"/tags/all/", b"/tags/gpu/",
                                   b"/tags/all/api/", b"http://x/", b"http://x/api/", b"https://x:1/0/"]))
    if b"api/" in prefix and draw(st.booleans()):
        prefix = prefix.replace(b"api", _spelled(b"api", draw))
    segment = _spelled(b"_admin", draw)
    segment += draw(st.sampled_from([b"", b";", b";x=1", b"%20", b"%09", b"%00", b"%3Bx"]))
    rest = draw(st.sampled_from([b"", b"/", b"/nodes", b"/status?x=1", b"?a=b", b"%2Fnodes"]))
    return prefix + segment + rest


@settings(max_examples=500)
@given(admin_spellings())
def test_no_spelling_of_the_admin_path_is_forwarded(target):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert raised.value.status == 404, target


@st.composite
def dot_segment_paths(draw):
    """A path with a ``.`` or ``..`` segment (or a backslash), raw or encoded, somewhere in it."""
    bad = draw(st.sampled_from([b".", b"..", b"\\"]))
    spelled = b"".join(
        bytes([byte]) if not draw(st.booleans()) else draw(st.sampled_from([b"%%%02X" % byte, b"%%25%02x" % byte]))
        for byte in bad)
    if bad != b"\\":
        spelled += draw(st.sampled_from([b"", b";", b";x"]))
    before = draw(st.lists(st.sampled_from([b"v1", b"api", b"tags", b"all", b"0", b"x%2Fy"]), max_size=3))
    after = draw(st.lists(st.sampled_from([b"models", b"_admin", b"status"]), max_size=2))
    slash = draw(st.sampled_from([b"/", b"%2F", b"%2f"])) if before else b"/"
    path = b"/" + b"/".join(before) + (slash if before else b"") + spelled
    return path + b"".join(b"/" + segment for segment in after) + draw(st.sampled_from([b"", b"?q=1"]))


@settings(max_examples=500)
@given(dot_segment_paths())
def test_dot_segments_and_backslashes_are_refused_in_any_spelling(target):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert raised.value.status == 400, target
