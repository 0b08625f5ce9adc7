"""Request target parsing and the /api segment rule."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.errors import ProxyError
from blyanproxy.routing import parse_route, strip_api_prefix


@pytest.mark.parametrize(
    "target, upstream",
    [
        (b"/v1/chat/completions", b"/v1/chat/completions"),
        (b"/api/chat", b"/chat"),
        (b"/api", b"/"),
        (b"/api?x=1", b"/?x=1"),
        (b"/api/", b"/"),
        (b"/apifoo", b"/apifoo"),
        (b"/api/a%2Fb?q=%20x", b"/a%2Fb?q=%20x"),
        (b"/x/api/y", b"/x/api/y"),
        (b"http://evil.example.com/v1/models?a=b", b"/v1/models?a=b"),
        (b"http://evil.example.com", b"/"),
        (b"https://evil.example.com?x", b"/?x"),
    ],
)
def test_upstream_target(target, upstream):
    assert parse_route(target).upstream_target == upstream


@pytest.mark.parametrize("target", [b"*", b"evil.example.com:443", b"ftp://x/y", b""])
def test_unusable_targets_are_400(target):
    with pytest.raises(ProxyError) as caught:
        parse_route(target)
    assert caught.value.status == 400


@given(st.binary(max_size=40))
def test_parse_route_is_total_and_never_leaves_the_path(target):
    try:
        route = parse_route(target)
    except ProxyError as err:
        assert err.status == 400
    else:
        assert route.upstream_target.startswith(b"/")


@pytest.mark.parametrize("target", [b"/api/_admin", b"/api/_admin/nodes", b"/api/_admin?x=1", b"http://h/api/_admin/status"])
def test_admin_paths_behind_api_are_never_forwarded(target):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert raised.value.status == 404


@pytest.mark.parametrize("target", [b"/api/_adminx", b"/api/x/_admin", b"/_administrator"])
def test_only_the_admin_segment_itself_is_refused(target):
    assert parse_route(target).upstream_target == strip_api_prefix(target)
