"""Request target parsing and the /api segment rule."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.core.errors import ProxyError
from blyanproxy.core.routing import parse_route, strip_api_prefix


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
        assert err.status in (400, 404)
    else:
        assert route.upstream_target.startswith(b"/")


@pytest.mark.parametrize("target", [
    b"/api/_admin", b"/api/_admin/nodes", b"/api/_admin?x=1", b"http://h/api/_admin/status",
    b"/0/_admin/nodes", b"/tags/all/_admin/nodes", b"/tags/all/api/_admin/nodes", b"/3/api/_admin",
])
def test_admin_paths_behind_api_are_never_forwarded(target):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert raised.value.status == 404


@pytest.mark.parametrize("target", [b"/api/_adminx", b"/api/x/_admin", b"/_administrator"])
def test_only_the_admin_segment_itself_is_refused(target):
    assert parse_route(target).upstream_target == strip_api_prefix(target)


@pytest.mark.parametrize(
    "target, tag, upstream",
    [
        (b"/tags/gpu/api/generate", "gpu", b"/api/generate"),
        (b"/tags/gpu", "gpu", b"/"),
        (b"/tags/gpu/", "gpu", b"/"),
        (b"/tags/gpu?x=1", "gpu", b"/?x=1"),
        (b"/tags/all/v1/models?a=b", "all", b"/v1/models?a=b"),
        (b"/tags/GPU/x", "GPU", b"/x"),
        (b"/tags/a%20b/x%2Fy", "a b", b"/x%2Fy"),
        (b"http://h/tags/t/x", "t", b"/x"),
    ],
)
def test_tag_routes_choose_by_tag_and_forward_the_rest_verbatim(target, tag, upstream):
    route = parse_route(target)
    assert (route.tag, route.index, route.upstream_target) == (tag, None, upstream)


@pytest.mark.parametrize(
    "target, index, upstream",
    [
        (b"/0/api/generate", 0, b"/api/generate"),
        (b"/12", 12, b"/"),
        (b"/3?q=1", 3, b"/?q=1"),
        (b"/007/x", 7, b"/x"),
    ],
)
def test_index_routes_choose_by_position(target, index, upstream):
    route = parse_route(target)
    assert (route.tag, route.index, route.upstream_target) == (None, index, upstream)


@pytest.mark.parametrize(
    "target, status, code",
    [
        (b"/tags", 400, "missing_tag"),
        (b"/tags/", 400, "missing_tag"),
        (b"/tags?x", 400, "missing_tag"),
        (b"/-1/x", 400, "bad_index"),
        (b"/+2", 400, "bad_index"),
        (b"/1234567/x", 404, "index_out_of_range"),
    ],
)
def test_bad_tag_and_index_routes(target, status, code):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert (raised.value.status, raised.value.code) == (status, code)


@pytest.mark.parametrize("target", [b"/api/tags", b"/tagsx/y", b"/v1/x", b"/1a/x", b"/x/0"])
def test_other_paths_are_policy_routes(target):
    route = parse_route(target)
    assert route.tag is None and route.index is None


def test_the_api_prefix_is_kept_for_ollama_nodes_only():
    from blyanproxy.core.routing import names_model, route_target

    route = parse_route(b"/api/chat?x=1&api=gpu")
    assert (route.upstream_target, route.api_target, route.node) == (b"/chat?x=1", b"/api/chat?x=1", "gpu")
    assert route_target(route, "ollama") == b"/api/chat?x=1"
    assert route_target(route, "blyan") == route_target(route, None) == b"/chat?x=1"
    assert route.client_path == b"/api/chat"
    assert names_model(route, b"POST") and not names_model(route, b"GET")
    plain = parse_route(b"/v1/chat/completions")
    assert plain.api_target is None and route_target(plain, "ollama") == b"/v1/chat/completions"
    tagged = parse_route(b"/tags/gpu/api/generate")
    assert route_target(tagged, "blyan") == b"/api/generate" and names_model(tagged, b"POST")
    assert not names_model(parse_route(b"/v1/models"), b"POST")


@pytest.mark.parametrize("target", [
    b"/api/%5Fadmin/nodes", b"/0/%5Fadmin/nodes", b"/tags/all/%5fadmin/x", b"/api/_ADMIN/nodes",
    b"http://x/%5Fadmin/status", b"/_ADMIN/nodes", b"/_Admin", b"/_admin;/status", b"/_admin%20/status",
    b"/_admin%09/status", b"/_admin;x=1", b"/api/%255Fadmin/nodes", b"/_admin%2Fstatus", b"//_admin/nodes",
    b"/api//_admin/nodes", b"/%41PI/_admin/nodes", b"/api;x/_admin", b"/tags/all/API/%5FADMIN",
])
def test_every_spelling_of_the_admin_segment_is_refused(target):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert (raised.value.status, raised.value.code) == (404, "not_found")


@pytest.mark.parametrize("target", [
    b"/_admin/..%2Fstatus", b"/x/../_admin", b"/x/./y", b"/x/%2e%2E/y", b"/x/%2e", b"/..", b"/x/..;/y",
    b"/_admin\\status", b"/x%5Cy", b"/x/%255C", b"http://h/a/../b", b"/tags/t/%2E%2E/x", b"/x/..?q=1",
])
def test_dot_segments_and_backslashes_are_400_raw_or_encoded(target):
    with pytest.raises(ProxyError) as raised:
        parse_route(target)
    assert (raised.value.status, raised.value.code) == (400, "bad_request_target")


@pytest.mark.parametrize("target", [b"/x/...", b"/x/.y", b"/x/y.", b"/v1/a..b", b"/x?p=../y", b"/x?p=a\\b"])
def test_dots_that_are_not_dot_segments_pass(target):
    assert parse_route(target).upstream_target == target


def test_naming_a_model_is_evolve_with_every_other_field_kept():
    import attrs

    from blyanproxy.core import Route

    values = {"upstream_target": b"/v1/chat/completions?x=1", "affinity_key": b"k", "tag": "gpu", "index": 2,
              "node": "n1", "api_target": b"/api/chat", "model": "old", "body": b"{}"}
    assert set(values) == {field.name for field in attrs.fields(Route)}  # a new field must be kept by naming too
    route = Route(**values)
    assert route.naming("m-1", b'{"model":"m-1"}') == attrs.evolve(route, model="m-1", body=b'{"model":"m-1"}')
