"""Pure parsing of a request target into a ``Route``: which nodes, and the path sent upstream.

Two path prefixes choose nodes inside a pool (the registry, or one API key's
workloads) and are removed before forwarding; the rest goes upstream byte for
byte (no ``/api`` removal):

- ``/tags/{tag}/rest``: nodes carrying ``tag`` (exact, case-sensitive);
  ``all`` means every node of the pool.
- ``/{n}/rest``: the ``n``-th node of the pool (from 0).

Any other path goes to the pool's policy, with a leading ``/api`` segment
removed for every node but an Ollama one (Blyan's frontend calls ``/api/chat``
on nodes that serve ``/chat``; Ollama's own API is ``/api/chat``):
``route_target`` gives the target for the node's engine.

A request to one of ``MODEL_PATHS`` (OpenAI's and Ollama's inference paths)
names a model in its JSON body; ``Route.model`` carries it, and the pool then
chooses only among nodes serving it.
The path is also checked the way other servers may read it (``check_path``,
``_is_admin_path``): percent-decoded (up to ``_DECODE_ROUNDS`` times, once for
each hop that may decode it again), case-folded, without ``;`` parameters,
empty segments or surrounding whitespace. So no spelling of ``/_admin`` behind
``/api``, a tag or an index reaches a node, and no dot segment or backslash
(which nginx and a node may resolve differently from twisted.web) gets through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

import attrs

from blyanproxy.core.engines import strips_api
from blyanproxy.core.errors import ProxyError
from blyanproxy.core.prefixkey import prefix_key
from blyanproxy.core.query import form_decoded

if TYPE_CHECKING:
    from blyanproxy.core.nodes import Node


@attrs.frozen
class Route:
    """Where one request goes.

    ``upstream_target`` is the path and query sent to the node, byte for byte as
    the client wrote them (``%2F`` stays encoded), minus a leading ``/api``
    segment and the ``api`` query parameter. ``affinity_key``, when set, keeps
    requests that share it on one node. ``node``, when set, is the id or name of
    the one registered node the request may go to (``?api=``). ``api_target``,
    when set, is the target with its ``/api`` kept (for Ollama nodes);
    ``model``, when set, is the model the body names; ``body`` is the JSON body
    of a request that names one (an inference POST), read for ``prefix_key``.
    """

    upstream_target: bytes
    affinity_key: bytes | None = None
    tag: str | None = None
    index: int | None = None
    node: str | None = None
    api_target: bytes | None = None
    model: str | None = None
    body: bytes | None = attrs.field(default=None, repr=False)

    def naming(self, model: str | None, body: bytes) -> Route:
        """This route for a body that names ``model``: ``attrs.evolve(self, model=model, body=body)``,
        built directly (once per inference request; ``evolve`` looks the fields up each time)."""
        return Route(upstream_target=self.upstream_target, affinity_key=self.affinity_key, tag=self.tag,
                     index=self.index, node=self.node, api_target=self.api_target, model=model, body=body)

    @property
    def prefix_key(self) -> bytes | None:
        """The hash of the body's prompt's leading part (``core.prefix_key``, for ``cache-aware``), or ``None``.

        Worked out when a policy asks, not for every request.
        """
        return None if self.body is None else prefix_key(self.body)

    @property
    def client_path(self) -> bytes:
        """The path the client asked for after any ``/tags/…`` or ``/{n}`` prefix, ``/api`` kept, no query."""
        return (self.api_target or self.upstream_target).partition(b"?")[0]


#: The inference paths whose JSON body names a ``model``: OpenAI's and Ollama's.
MODEL_PATHS = frozenset({
    b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses",
    b"/api/generate", b"/api/chat", b"/api/embed", b"/api/embeddings",
})


def names_model(route: Route, method: bytes) -> bool:
    """Whether the request's body names the model to route by (a POST to one of ``MODEL_PATHS``)."""
    return method == b"POST" and route.client_path in MODEL_PATHS


def route_target(route: Route, engine: str | None) -> bytes:
    """The target sent to a node running ``engine``: ``/api`` kept for Ollama, removed for the others."""
    if route.api_target is not None and not strips_api(engine):
        return route.api_target
    return route.upstream_target


#: The tag that means every node of the pool.
ALL_TAG = "all"
#: Longest index accepted: more digits cannot name a node of any real pool.
_MAX_INDEX_DIGITS = 6
#: The query parameter that chooses a registered node by id or name (Blyan's ``?api=``).
NODE_PARAMETER = "api"
#: How many times a path is percent-decoded before it is checked: one round for each server
#: that may decode it again (nginx or twisted.web, then a node that is itself a proxy …).
_DECODE_ROUNDS = 3
#: What a segment may be wrapped in and still name the same thing to a lenient server.
_SEGMENT_PADDING = b" \t\r\n\x0b\x0c\x00"
BAD_PATH = ProxyError(400, "bad_request_target", "the path must not hold dot segments or backslashes")


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


def _split_first_segment(target: bytes) -> tuple[bytes, bytes]:
    """``(first segment, rest)`` of an origin-form target: ``/a/b?q`` → ``(b"a", b"/b?q")``.

    The rest always starts with ``/`` (``/a?q`` → ``(b"a", b"/?q")``).
    """
    path, sep, query = target.partition(b"?")
    first, slash, tail = path[1:].partition(b"/")
    return first, b"/" + tail + sep + query


def _index_of(segment: bytes) -> int | None:
    """The index a first path segment names, ``None`` if it names none; 400 for a signed number."""
    if segment.isdigit():
        if len(segment) > _MAX_INDEX_DIGITS:
            raise ProxyError(404, "index_out_of_range", "no node has that index")
        return int(segment)
    if segment[:1] in (b"-", b"+") and segment[1:].isdigit():
        raise ProxyError(400, "bad_index", "a node index must be a number from 0")
    return None


def _decoded_path(target: bytes) -> bytes:
    """The path of an origin-form target, percent-decoded up to ``_DECODE_ROUNDS`` times."""
    path = target.partition(b"?")[0]
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote_to_bytes(path)
        if decoded == path:
            break
        path = decoded
    return path


def _segment_names(decoded_path: bytes) -> list[bytes]:
    """The non-empty segments of a decoded path as a lenient server reads them: lower-case,
    without ``;`` parameters or surrounding whitespace."""
    names = (segment.split(b";", 1)[0].strip(_SEGMENT_PADDING).lower() for segment in decoded_path.split(b"/"))
    return [name for name in names if name]


def check_path(target: bytes) -> None:
    """Raise the 400 ``BAD_PATH`` when the path of ``target`` (origin-form) holds a dot segment
    (``.``, ``..``, ``..;x``) or a backslash, raw or percent-encoded; the query is not checked."""
    decoded = _decoded_path(target)
    if b"\\" in decoded:
        raise BAD_PATH
    for segment in decoded.split(b"/"):
        if segment.split(b";", 1)[0].strip(_SEGMENT_PADDING) in (b".", b".."):
            raise BAD_PATH


def _refuse_admin(upstream: bytes) -> bytes:
    """``upstream`` unless it, or it without an ``api`` segment, is an ``/_admin`` path in any
    spelling (``/%5Fadmin``, ``/API/_ADMIN``, ``/_admin;x``, ``//_admin``): 404 then."""
    names = _segment_names(_decoded_path(upstream))
    if names[:1] == [b"_admin"] or names[:2] == [b"api", b"_admin"]:
        raise ProxyError(404, "not_found", "the admin API is served only under /_admin")
    return upstream


def _form_decoded(text: bytes) -> str:
    """A query name or value as text (``+`` is a space, ``%XX`` decoded, UTF-8)."""
    return form_decoded(text).decode("utf-8", "replace")


def take_node_parameter(target: bytes) -> tuple[bytes, str | None]:
    """Split ``api=<node id or name>`` off a target's query: ``(target without it, value or None)``.

    Only a registered node's id or name can be chosen this way, never an
    address. The other parameters stay byte for byte, in order; a query left
    empty is dropped with its ``?``. Names are compared decoded (``%61pi`` is
    ``api``), so no spelling slips past; an empty or repeated choice is a 400.
    """
    path, sep, query = target.partition(b"?")
    if not sep:
        return target, None
    kept, chosen = [], []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if _form_decoded(name) == NODE_PARAMETER:
            chosen.append(_form_decoded(value))
        else:
            kept.append(part)
    if not chosen:
        return target, None
    if len(chosen) > 1 or not chosen[0]:
        raise ProxyError(400, "bad_node_choice", "api= must name one node, by id or name, once", param="api")
    return (path + b"?" + b"&".join(kept) if kept else path), chosen[0]


def parse_route(target: bytes) -> Route:
    """Turn a raw request target into a ``Route``; raises ``ProxyError`` when unusable.

    400 for a target that is not a path, a path with a dot segment or a
    backslash (``check_path``), ``/tags`` without a tag, a signed index or a
    malformed ``?api=``; 404 for an ``/_admin`` path in any spelling behind
    ``/api``, a tag or an index (``/api/_admin``, ``/0/%5Fadmin``,
    ``/api/_ADMIN``): the admin API lives only at ``/_admin``, so an
    allow-list in front of that one prefix cannot be bypassed, and no node
    ever sees such a path.
    """
    origin = request_target_path(target)
    check_path(origin)
    first, rest = _split_first_segment(origin)
    if first == b"tags":
        tag_segment, rest = _split_first_segment(rest)
        if not tag_segment:
            raise ProxyError(400, "missing_tag", "Missing tag. Use /tags/{tag}")
        tag = unquote_to_bytes(tag_segment).decode("utf-8", "replace")
        return Route(upstream_target=_refuse_admin(rest), tag=tag)
    index = _index_of(first)
    if index is not None:
        return Route(upstream_target=_refuse_admin(rest), index=index)
    stripped = strip_api_prefix(origin)
    upstream, node = take_node_parameter(_refuse_admin(stripped))
    api_target = take_node_parameter(origin)[0] if stripped != origin else None
    return Route(upstream_target=upstream, node=node, api_target=api_target)


def route_allows(route: Route, node: Node) -> bool:
    """Whether ``node`` may take the request: any node, or the one ``?api=`` names (id or name)."""
    return route.node is None or route.node in (node.id, node.name)
