"""Query parameters as bytes: split and form-decoded, never failing."""

from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.core.query import form_decoded, query_parameters


def test_parameters_keep_order_and_tell_a_missing_value_from_an_empty_one():
    assert query_parameters(b"a=1&&b&c=&a=2") == [(b"a", b"1"), (b"b", None), (b"c", b""), (b"a", b"2")]
    assert query_parameters(b"") == []


def test_form_decoding_gives_the_bytes_the_escapes_spell():
    assert form_decoded(b"a+b%2B%E2%80%A8%ff%zz") == b"a b+\xe2\x80\xa8\xff%zz"


@given(st.binary(max_size=40))
def test_both_are_total(query):
    for name, value in query_parameters(query):
        assert isinstance(form_decoded(name), bytes)
        assert value is None or isinstance(form_decoded(value), bytes)
