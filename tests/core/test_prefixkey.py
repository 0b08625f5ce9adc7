"""The prompt's prefix key: same leading part, same key; bounded work on any body."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from blyanproxy.core import prefix_key
from blyanproxy.core.prefixkey import PREFIX_BYTES, SCAN_BYTES

SYSTEM = "You are a careful assistant. " * 200


def chat(*turns: str, **extra: object) -> bytes:
    messages = [{"role": "system", "content": SYSTEM}] + [{"role": "user", "content": t} for t in turns]
    return json.dumps({"messages": messages, "model": "m", **extra}).encode()


def test_one_long_system_prompt_gives_one_key_whatever_follows():
    assert prefix_key(chat("hello")) == prefix_key(chat("another", "and more", stream=True)) is not None


def test_spacing_between_tokens_does_not_change_the_key():
    compact = json.dumps({"messages": [{"role": "user", "content": "hi"}]}, separators=(",", ":")).encode()
    spaced = json.dumps({"messages": [{"role": "user", "content": "hi"}]}, indent=2).encode()
    assert prefix_key(compact) == prefix_key(spaced)


def test_long_system_prompts_that_differ_give_other_keys():
    other = json.dumps({"messages": [{"role": "system", "content": "Be brief. " * 500}]}).encode()
    assert prefix_key(chat("hello")) != prefix_key(other)


def test_other_prompts_other_keys():
    assert prefix_key(b'{"prompt": "alpha"}') != prefix_key(b'{"prompt": "beta"}')
    assert prefix_key(b'{"prompt": "alpha"}') != prefix_key(b'{"messages": "alpha"}')
    assert prefix_key(b'{"prompt": [1, 2, 3]}') != prefix_key(b'{"prompt": [1, 2, 4]}')


def test_only_a_top_level_key_counts():
    assert prefix_key(b'{"model": "m", "metadata": {"prompt": "x"}}') is None
    assert prefix_key(b'{"input": "the \\"prompt\\": is here"}') is None
    assert prefix_key(b'{"metadata": {"prompt": "x"}, "prompt": "y"}') == prefix_key(b'{"prompt": "y"}')


def test_no_prompt_or_not_json_gives_no_key():
    assert prefix_key(b"") is None and prefix_key(b"not json") is None and prefix_key(b'{"model": "m"}') is None


@given(st.text(max_size=PREFIX_BYTES), st.text(), st.text())
def test_a_shared_leading_part_longer_than_the_bound_shares_a_key(shared, tail_a, tail_b):
    lead = "x" * PREFIX_BYTES + shared
    one = json.dumps({"prompt": lead + tail_a}).encode()
    two = json.dumps({"prompt": lead + tail_b}).encode()
    assert prefix_key(one) == prefix_key(two) is not None  # the same leading PREFIX_BYTES of JSON text


@given(st.binary(max_size=4096))
def test_total_on_any_bytes(body):
    key = prefix_key(body)
    assert key is None or len(key) == 16


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(1, 8))
def test_what_lies_past_the_scan_window_is_never_read(junk, repeats):
    head = b'{"pad": "' + b"a" * SCAN_BYTES + b'", '
    body = head + b'"prompt": "late"}' + junk * repeats
    assert prefix_key(body) is None  # the prompt starts past the window
    assert prefix_key(body) == prefix_key(head)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([b'"prompt": 1, ', b'{"prompt": [', b'"messages"', b'[[[[', b'"\\"']))
def test_hostile_bodies_of_many_megabytes_are_read_in_bounded_time(piece):
    body = b"{" + piece * (4 * 1024 * 1024 // len(piece))
    key = prefix_key(body)  # bounded: at most MAX_KEYS bracket counts over SCAN_BYTES
    assert key is None or len(key) == 16
