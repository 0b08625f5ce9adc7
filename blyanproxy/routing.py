"""Pure parsing of a request target into a ``Route``: which nodes, and the path sent upstream."""

from __future__ import annotations

from typing import Optional

import attrs

from .errors import ProxyError


@attrs.frozen
class Route:
    """Where one request goes.

    ``upstream_target`` is the path and query sent to the node, byte for byte as
    the client wrote them (``%2F`` stays encoded), minus a leading ``/api``
    segment. ``affinity_key``, when set, keeps requests that share it on one node.
    """

    upstream_target: bytes
    affinity_key: Optional[bytes] = None


def request_target_path(target: bytes) -> bytes:
    """The origin-form (``/path?query``) of a request target.

    Absolute-form targets (``http://host/path``) are reduced to their path: the
    authority a client names never chooses where traffic goes. Anything else
    (``*``, authority-form) is refused.
    """
    if target.startswith(b"/"):
        return target
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https") and rest:
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash == -1 or (query != -1 and query < slash):
            return b"/" + (rest[query:] if query != -1 else b"")
        return rest[slash:]
    raise ProxyError(400, "bad_request_target", "the request target must be a path")


def strip_api_prefix(target: bytes) -> bytes:
    """Remove a leading ``/api`` path segment (only as a whole segment: ``/apifoo`` stays)."""
    if target.startswith(b"/api"):
        rest = target[4:]
        if not rest:
            return b"/"
        if rest[:1] == b"/":
            return rest
        if rest[:1] == b"?":
            return b"/" + rest
    return target


def parse_route(target: bytes) -> Route:
    """Turn a raw request target into a ``Route``; raises ``ProxyError`` when unusable.

    400 for a target that is not a path; 404 for ``/api/_admin...``: the admin
    API lives only at ``/_admin``, so an allow-list in front of that one prefix
    cannot be bypassed through ``/api``, and no node ever sees such a path.
    """
    upstream = strip_api_prefix(request_target_path(target))
    if upstream.split(b"?", 1)[0].split(b"/", 2)[1] == b"_admin":
        raise ProxyError(404, "not_found", "the admin API is served only under /_admin")
    return Route(upstream_target=upstream)
