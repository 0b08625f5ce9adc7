"""Admin input checks: every field's refusal names the field; nothing unhashable or odd slips by."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blyanproxy.admin.nodeinput import (
    new_node_fields,
    node_changes,
    policy_name,
    strict_index,
)
from blyanproxy.core.errors import ProxyError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@pytest.mark.parametrize("value", [[], {}, 3, None, "fastest"])
def test_policy_refuses_anything_but_a_known_name(value):
    with pytest.raises(ProxyError) as caught:
        policy_name({"policy": value})
    assert caught.value.status == 400 and caught.value.message.startswith("policy:")


@pytest.mark.parametrize("text", ["0", "7", "123"])
def test_strict_index_accepts_plain_digits(text):
    assert strict_index(text) == int(text)


@pytest.mark.parametrize("text", ["01", "-1", "1.0", "1e2", " 1", "", "٣"])
def test_strict_index_refuses_the_rest(text):
    with pytest.raises(ProxyError):
        strict_index(text)


@given(json_values)
def test_new_node_input_is_total(document):
    """Any JSON document is either a valid node or a 400 naming a field or the body."""
    try:
        fields = new_node_fields(document)
    except ProxyError as err:
        assert err.status == 400 and err.message
    else:
        assert set(fields) >= {"name", "base_url"}


@given(json_values)
def test_node_changes_are_total(document):
    try:
        node_changes(document)
    except ProxyError as err:
        assert err.status == 400


def test_engine_and_models_can_be_given_and_changed():
    fields = new_node_fields({"name": "g", "baseURL": "http://h:1", "engine": "vllm", "models": ["a", "b"]})
    assert (fields["engine"], fields["models"]) == ("vllm", ("a", "b"))
    assert node_changes({"engine": "auto", "models": []}) == {"engine": "auto", "models": ()}
    with pytest.raises(ProxyError) as bad:
        node_changes({"models": "a,b"})
    assert bad.value.message.startswith("models: must be a list")
