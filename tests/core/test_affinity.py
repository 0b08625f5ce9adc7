"""Affinity: key extraction, stickiness, minimal movement, bounded load."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.core.affinity import (
    MIN_BOUND,
    AffinitySource,
    affinity_key,
    choose_by_key,
    parse_affinity_source,
)
from blyanproxy.core.nodes import Node
from blyanproxy.core.selection import Candidate


def pool(count, loads=None):
    loads = loads or [0] * count
    return [Candidate(Node(id=f"n{i}", name=f"n{i}", base_url=f"http://10.0.0.{i}:1"), in_flight=loads[i])
            for i in range(count)]


@pytest.mark.parametrize("text", ["header", "body:x", "query:", "header:a b"])
def test_bad_sources_are_refused(text):
    with pytest.raises(ValueError):
        parse_affinity_source(text)


def test_keys_from_header_cookie_and_query():
    request = DummyRequest([b"queue", b"stream"])
    request.uri = b"/queue/stream?a=1&ticket_id=t-42"
    request.requestHeaders.setRawHeaders(b"x-session", [b"s-1"])
    request.received_cookies = {b"sid": b"c-9"}
    assert affinity_key(parse_affinity_source("query:ticket_id"), request) == b"t-42"
    assert affinity_key(parse_affinity_source("header:X-Session"), request) == b"s-1"
    assert affinity_key(parse_affinity_source("cookie:sid"), request) == b"c-9"
    assert affinity_key(AffinitySource("query", "missing"), request) is None
    assert affinity_key(None, request) is None


@given(st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=50, unique=True), st.integers(2, 8))
def test_when_a_node_leaves_only_its_keys_move(keys, count):
    before = {key: choose_by_key(key, pool(count), 1.25).node.id for key in keys}
    survivors = [c for c in pool(count) if c.node.id != "n0"]
    after = {key: choose_by_key(key, survivors, 1.25).node.id for key in keys}
    for key in keys:
        if before[key] != "n0":
            assert after[key] == before[key]


def test_keys_spread_over_nodes():
    picks = Counter(choose_by_key(b"session-%d" % i, pool(4), 1.25).node.id for i in range(2000))
    assert set(picks) == {"n0", "n1", "n2", "n3"}
    assert min(picks.values()) > 350


@given(st.lists(st.integers(0, 60), min_size=2, max_size=6), st.binary(min_size=1, max_size=8))
def test_bounded_load_never_picks_a_node_over_the_bound(loads, key):
    candidates = pool(len(loads), loads)
    chosen = choose_by_key(key, candidates, 1.25)
    bound = max(-(-1.25 * (sum(loads) + 1) // len(loads)), MIN_BOUND)
    assert chosen.in_flight + 1 <= bound or chosen.in_flight == min(loads)


def test_at_low_load_a_key_keeps_its_node_while_its_last_request_runs():
    keys = [b"ticket-%d" % i for i in range(300)]
    idle = {key: choose_by_key(key, pool(3), 1.25).node.id for key in keys}
    for key in keys:
        loads = [1 if f"n{i}" == idle[key] else 0 for i in range(3)]
        assert choose_by_key(key, pool(3, loads), 1.25).node.id == idle[key]


class QueryRequest:
    """The request shape ``affinity_key`` reads, with only a target (no headers or cookies)."""

    def __init__(self, uri):
        self.uri = uri
        self.received_cookies = {}

    def getHeader(self, name):
        return None


def test_a_query_key_outside_latin_1_is_its_bytes():
    source = parse_affinity_source("query:t")
    assert affinity_key(source, QueryRequest(b"/x?t=%E2%80%A8")) == "\u2028".encode()
    assert affinity_key(source, QueryRequest(b"/x?t=%FF%00")) == b"\xff\x00"  # not UTF-8: kept as bytes
    assert affinity_key(source, QueryRequest(b"/x?t=a+b&t=c")) == b"a b"  # the first, form-decoded
    assert affinity_key(source, QueryRequest(b"/x?t")) == b""  # present, empty
    assert affinity_key(parse_affinity_source("query:\u00e9t\u00e9"), QueryRequest(b"/x?%C3%A9t%C3%A9=1")) == b"1"


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=6)
query_bytes = st.lists(st.one_of(st.sampled_from([b"&", b"=", b"+", b"%", b"%E2%80%A8", b"%FF", b"t", b"?"]),
                                 st.binary(max_size=4)), max_size=10).map(b"".join)


@given(st.sampled_from(["query", "header", "cookie"]), names, query_bytes)
def test_affinity_key_is_total_bytes_in_bytes_out(kind, name, query):
    request = QueryRequest(b"/x?" + query)
    key = affinity_key(AffinitySource(kind, name), request)
    assert key is None or isinstance(key, bytes)


@given(names, st.binary(max_size=12))
def test_a_query_key_round_trips_any_bytes(name, value):
    from urllib.parse import quote_from_bytes

    # The parameter is the first of its name: a later one of the same name (``a``) does not count.
    target = b"/x?" + quote_from_bytes(name.encode()).encode() + b"=" + quote_from_bytes(value).encode() + b"&a=1"
    assert affinity_key(AffinitySource("query", name), QueryRequest(target)) == value
