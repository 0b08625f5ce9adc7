"""model_of: the top-level "model" string of a JSON body, agreeing with json.loads, total on any bytes."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from blyanproxy.core.modelfield import model_of

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_KEYS = st.sampled_from(["model", "messages", "prompt", "content", "mod", "model ", "Model"]) | st.text(max_size=8)
_VALUES = st.recursive(
    _SCALARS | st.sampled_from(['"model": "x"', '\\"model\\": \\"y\\"', "model", '{"model": "z"}']),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


def expected(document: object) -> str | None:
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None


def encode(document: object, ensure_ascii: bool, indent: int | None, sort_keys: bool) -> bytes:
    return json.dumps(document, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys).encode("utf-8")


@settings(max_examples=400)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6), st.booleans(), st.sampled_from([None, 0, 2]), st.booleans())
def test_agrees_with_json_loads_on_objects(document, ensure_ascii, indent, sort_keys):
    body = encode(document, ensure_ascii, indent, sort_keys)
    assert model_of(body) == expected(json.loads(body))


@settings(max_examples=200)
@given(_VALUES, st.booleans())
def test_agrees_with_json_loads_on_any_value(document, ensure_ascii):
    body = json.dumps(document, ensure_ascii=ensure_ascii).encode("utf-8")
    assert model_of(body) == expected(json.loads(body))


@given(st.binary(max_size=300))
def test_total_on_any_bytes(body):
    result = model_of(body)
    assert result is None or isinstance(result, str)


@given(st.text(max_size=40), st.text(alphabet='{}[]":,\\ model', max_size=60))
def test_total_on_json_like_noise(model, noise):
    for body in (noise.encode(), ('{"model": "' + model + '"' + noise).encode("utf-8", "surrogatepass")):
        result = model_of(body)
        assert result is None or isinstance(result, str)


def test_model_after_a_long_prompt():
    prompt = "word " * 20000
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "model": "gpt-x", "stream": True})
    assert model_of(body.encode()) == "gpt-x"


def test_model_first():
    assert model_of(b'{"model":"a","prompt":"' + b"x" * 5000 + b'"}') == "a"


def test_nested_model_keys_do_not_count():
    assert model_of(b'{"tools": [{"model": "inner"}], "x": {"model": "deeper"}}') is None
    assert model_of(b'{"tools": [{"model": "inner"}], "model": "outer"}') == "outer"
    assert model_of(b'[{"model": "in an array"}]') is None


def test_model_inside_a_string_does_not_count():
    assert model_of(b'{"prompt": "say \\"model\\": \\"fake\\"", "model": "real"}') == "real"
    assert model_of(b'{"prompt": "say \\"model\\": \\"fake\\""}') is None


def test_last_of_duplicate_keys_wins_as_in_json_loads():
    assert model_of(b'{"model": "a", "model": "b"}') == "b"
    assert model_of(b'{"model": "a", "model": 3}') is None


def test_escaped_value_is_decoded():
    assert model_of(b'{"model": "caf\\u00e9"}') == "caf\u00e9"


def test_many_model_keys_are_parsed_in_full():
    nested = ", ".join(f'"k{i}": {{"model": "n{i}"}}' for i in range(20))
    assert model_of(('{' + nested + ', "model": "top"}').encode()) == "top"
    assert model_of(('{"model": "top", ' + nested + '}').encode()) == "top"


def test_non_string_models_and_non_json():
    assert model_of(b'{"model": 7}') is None
    assert model_of(b'{"model": null}') is None
    assert model_of(b"") is None
    assert model_of(b"not json") is None


def test_utf16_body_is_read_like_json_loads():
    assert model_of('{"model": "wide"}'.encode("utf-16")) == "wide"
