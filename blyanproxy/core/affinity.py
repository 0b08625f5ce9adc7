"""Session affinity: requests with the same key go to the same node while it is usable.

The key comes from a header, a cookie or a query parameter (``AFFINITY_KEY``,
e.g. ``query:ticket_id`` for Blyan's queue flow). The node is chosen by
rendezvous hashing (highest score of ``hash(key, node id)``) with bounded
load: a node already holding more than ``load_factor`` times the average
in-flight count (and at least ``MIN_BOUND``) is passed over for the next best. When a node leaves, only
the keys that were on it move; every other key keeps its node.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import attrs

from blyanproxy.core.candidate import Candidate
from blyanproxy.core.query import form_decoded, query_parameters
from blyanproxy.core.requestview import RequestView

_KINDS = ("header", "cookie", "query")
#: Below this many requests in flight a node always keeps its keys: at low load the
#: bound would otherwise move a session whose previous request is still running.
MIN_BOUND = 8


@attrs.frozen
class AffinitySource:
    """Where a request's affinity key is read from."""

    kind: str
    name: str


def parse_affinity_source(text: str) -> AffinitySource:
    """``header:NAME``, ``cookie:NAME`` or ``query:NAME``; ``ValueError`` otherwise."""
    kind, sep, name = text.partition(":")
    if not sep or kind not in _KINDS or not name or not name.isprintable() or " " in name:
        raise ValueError("expected header:NAME, cookie:NAME or query:NAME")
    return AffinitySource(kind, name)


def affinity_key(source: AffinitySource | None, request: RequestView) -> bytes | None:
    """The request's affinity key, or None when it carries none (or affinity is off).

    Bytes in, bytes out, for any request: a query key is the form-decoded bytes
    of the first parameter whose decoded name is the source's name (UTF-8), and
    is never read as text.
    """
    if source is None:
        return None
    name = source.name.encode("utf-8")
    if source.kind == "header":
        return request.getHeader(name)
    if source.kind == "cookie":
        return request.received_cookies.get(name)
    _, _, query = request.uri.partition(b"?")
    for raw_name, raw_value in query_parameters(query):
        if form_decoded(raw_name) == name:
            return form_decoded(raw_value or b"")
    return None


def _score(key: bytes, node_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"\x00" + node_id.encode(), digest_size=8).digest(), "big")


def choose_by_key(key: bytes, candidates: Sequence[Candidate], load_factor: float) -> Candidate:
    """The candidate this key belongs to, passing over nodes loaded beyond the bound."""
    ranked = sorted(candidates, key=lambda c: _score(key, c.node.id), reverse=True)
    total = sum(c.in_flight for c in candidates) + 1
    bound = max(math.ceil(load_factor * total / len(candidates)), MIN_BOUND)
    for candidate in ranked:
        if candidate.in_flight + 1 <= bound:
            return candidate
    return min(ranked, key=lambda c: c.in_flight)
