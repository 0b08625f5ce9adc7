"""Request ids: the client's when usable, a fresh one otherwise; the headers a node gets."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.core import RequestId, new_request_id, replace_headers, request_id_for


def test_a_usable_id_is_kept():
    assert request_id_for([b"abc-123"]) == RequestId("abc-123")
    longest = bytes(range(0x21, 0x7F)) + b"x" * 34
    assert len(longest) == 128 and request_id_for([longest]) == RequestId(longest.decode())


@pytest.mark.parametrize(("sent", "why"), [
    ([], None),
    ([b""], "it is empty"),
    ([b"x" * 129], "it is longer than 128 characters"),
    ([b"a b"], "it is not printable ASCII without spaces"),
    ([b"a\tb"], "it is not printable ASCII without spaces"),
    ([b"\x7f"], "it is not printable ASCII without spaces"),
    ([b"a", b"a"], "it came more than once"),
])
def test_anything_else_is_replaced_by_a_new_id_saying_why(sent, why):
    assert request_id_for(sent, make=lambda: "fresh") == RequestId("fresh", why)


@given(st.lists(st.binary(max_size=140), max_size=3))
def test_the_id_is_always_safe_for_a_header_and_a_log_line(sent):
    value = request_id_for(sent).value
    assert 1 <= len(value) <= 128 and all("!" <= c <= "~" for c in value)


def test_new_ids_are_32_hex_characters_and_differ():
    ids = {new_request_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(one) == 32 and int(one, 16) >= 0 for one in ids)


def test_replaced_headers_take_the_one_value_given_whatever_the_case():
    headers = [(b"Host", [b"n"]), (b"x-request-id", [b"client"]), (b"TraceParent", [b"a", b"b"]), (b"X", [b"1"])]
    assert replace_headers(headers, [(b"X-Request-Id", b"ours"), (b"traceparent", b"00-t")]) == [
        (b"Host", [b"n"]), (b"X", [b"1"]), (b"X-Request-Id", [b"ours"]), (b"traceparent", [b"00-t"])]
    assert replace_headers(headers, []) == headers


def test_ids_come_from_fresh_randomness_read_a_chunk_at_a_time():
    from blyanproxy.core.requestid import _RandomHex

    reads = []

    def read(count):
        reads.append(count)
        return bytes([len(reads)]) * count

    source = _RandomHex(read, chunk=32)  # 64 hex characters: two ids a read
    taken = [source.take(32) for _ in range(5)]
    assert reads == [32, 32, 32]
    assert taken == ["01" * 16, "01" * 16, "02" * 16, "02" * 16, "03" * 16]  # no hex character is used twice
