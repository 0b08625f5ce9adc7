"""The node rules (name, tags, weight, base-URL uniqueness), and every caller applying the same ones."""

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from blyanproxy.admin.nodeinput import new_node_fields
from blyanproxy.config import ConfigError, parse_node, settings_from
from blyanproxy.core.engines import ENGINES
from blyanproxy.core.errors import ProxyError
from blyanproxy.core.fleetedit import add_node, update_node
from blyanproxy.core.fleetstate import FleetState, node_from_json
from blyanproxy.core.noderules import (
    NodeFieldError,
    check_url_free,
    is_model_name,
    is_tag,
    node_engine,
    node_models,
    node_name,
    node_tags,
    node_weight,
    url_taken,
)
from blyanproxy.core.nodes import Node, NodeRegistry


def node(index, url=None, **fields):
    fields.setdefault("name", f"gpu{index}")
    return Node(id=f"n{index}", base_url=url or f"http://10.0.0.{index}:8000", **fields)


@pytest.mark.parametrize("text, name", [("gpu-a", "gpu-a"), ("  spaced  ", "spaced"), ("é 名前", "é 名前"),
                                        ("x" * 128, "x" * 128)])
def test_a_name_is_kept_without_surrounding_spaces(text, name):
    assert node_name(text) == name


@pytest.mark.parametrize("value", ["", "   ", "x" * 129, "a|b", "a\nb", "a\tb", "a\x7fb", "a\u2028b", None, 3, ["a"]])
def test_a_name_that_breaks_the_rule_is_refused_naming_the_field(value):
    with pytest.raises(NodeFieldError) as caught:
        node_name(value)
    assert caught.value.field == "name"
    assert str(caught.value) == "name must be 1 to 128 printable characters, without '|'"


@pytest.mark.parametrize("tag, valid", [("a100", True), ("eu-west:1.b_c", True), ("x" * 64, True),
                                        ("x" * 65, False), ("-lead", False), ("has space", False), ("", False),
                                        ("ü", False), (7, False)])
def test_tags(tag, valid):
    assert is_tag(tag) is valid


def test_a_list_or_tuple_of_tags_becomes_a_tuple():
    assert node_tags(["a", "b"]) == ("a", "b")
    assert node_tags(("a",)) == ("a",)
    assert node_tags([]) == ()


@pytest.mark.parametrize("values", ["a100", ["ok", "not ok"], [3], {"a": 1}, None])
def test_anything_else_is_not_tags(values):
    with pytest.raises(NodeFieldError) as caught:
        node_tags(values)
    assert caught.value.field == "tags" and caught.value.problem.startswith("must be a list of tags")


@pytest.mark.parametrize("value", [1, 7, 1000])
def test_a_weight_is_a_whole_number_from_1_to_1000(value):
    assert node_weight(value) == value


@pytest.mark.parametrize("value", [0, 1001, -1, True, 2.0, "3", None])
def test_anything_else_is_not_a_weight(value):
    with pytest.raises(NodeFieldError) as caught:
        node_weight(value)
    assert str(caught.value) == "weight must be a whole number from 1 to 1000"


def test_a_base_url_is_free_unless_another_node_has_it_parsed_alike():
    fleet = [node(1), node(2)]
    check_url_free(fleet, node(3))
    check_url_free(fleet, node(1, name="renamed"))  # the node itself
    with pytest.raises(ValueError) as caught:
        check_url_free(fleet, node(3, url="http://10.0.0.2:8000/"))
    assert str(caught.value) == "base URL http://10.0.0.2:8000/ is already used by node gpu2"


def test_the_registry_the_fleet_edits_and_the_settings_refuse_a_taken_url_in_the_same_words():
    registry = NodeRegistry()
    registry.add(node(1))
    expected = url_taken("http://10.0.0.1:8000", "node gpu1")
    with pytest.raises(ValueError, match=expected):
        registry.add(node(2, url="http://10.0.0.1:8000"))
    registry.add(node(2))
    with pytest.raises(ValueError, match=expected):
        registry.update("n2", base_url="http://10.0.0.1:8000")
    state = FleetState(nodes=(node(1),))
    with pytest.raises(ValueError, match=expected):
        add_node(node(2, url="http://10.0.0.1:8000"))(state)
    with pytest.raises(ValueError, match=expected):
        update_node("n2", base_url="http://10.0.0.1:8000")(FleetState(nodes=(node(1), node(2))))
    with pytest.raises(ConfigError, match="NODE_2: " + url_taken("http://10.0.0.1:8000", "NODE_1")):
        settings_from({"NODE_1": "a|http://10.0.0.1:8000", "NODE_2": "b|http://10.0.0.1:8000/"}, {})


def test_each_caller_keeps_its_prefix():
    with pytest.raises(ProxyError) as admin:
        new_node_fields({"name": "x", "baseURL": "http://h:1", "weight": 0})
    assert admin.value.message == "weight: must be a whole number from 1 to 1000"
    with pytest.raises(ValueError) as stored:
        node_from_json({"name": "gpu-a", "baseURL": "http://h:1", "weight": 0})
    assert str(stored.value) == "node 'gpu-a': weight must be a whole number from 1 to 1000"
    with pytest.raises(ValueError) as declared:
        parse_node("gpu-a|http://h:1|weight=0", "NODE_1")
    assert str(declared.value) == "weight: must be a whole number from 1 to 1000 (got '0')"
    with pytest.raises(ValueError) as named:
        parse_node("\x01|http://h:1", "NODE_1")
    assert str(named.value) == "name: must be 1 to 128 printable characters, without '|' (got '\\x01')"


def _admin_accepts(document):
    try:
        return new_node_fields(document)
    except ProxyError:
        return None


def _settings_accept(text):
    try:
        return parse_node(text, "NODE_1")
    except ValueError:
        return None


@given(st.text(max_size=140))
def test_the_settings_and_the_admin_api_accept_the_same_names(name):
    assume("|" not in name)  # the separator of NODE_<n>: the name would end there
    declared = _settings_accept(f"{name}|http://h:1")
    admitted = _admin_accepts({"name": name.strip(), "baseURL": "http://h:1"})
    assert (declared is None) == (admitted is None)
    if declared is not None:
        assert declared.name == admitted["name"]


@given(st.integers(-5, 1005))
def test_the_settings_the_admin_api_and_the_stored_fleet_accept_the_same_weights(weight):
    declared = _settings_accept(f"gpu|http://h:1|weight={weight}")
    admitted = _admin_accepts({"name": "gpu", "baseURL": "http://h:1", "weight": weight})
    try:
        stored = node_from_json({"name": "gpu", "baseURL": "http://h:1", "weight": weight})
    except ValueError:
        stored = None
    assert (declared is None) == (admitted is None) == (stored is None) == (not 1 <= weight <= 1000)


@given(st.lists(st.text(alphabet="ab-_.:/ 9ü", min_size=1, max_size=66), max_size=3))
def test_the_settings_and_the_admin_api_accept_the_same_tags(tags):
    assume(all(t == t.strip() for t in tags))  # NODE_<n> strips each tag
    declared = _settings_accept("gpu|http://h:1|tags=" + ",".join(tags))
    admitted = _admin_accepts({"name": "gpu", "baseURL": "http://h:1", "tags": tags})
    assert (declared is None) == (admitted is None)
    if declared is not None:
        assert declared.tags == admitted["tags"] == tuple(tags)


def _stored(document):
    try:
        return node_from_json({"name": "gpu", "baseURL": "http://h:1", **document})
    except ValueError:
        return None


@given(st.sampled_from(["auto", "vllm", "sglang", "llamacpp", "ollama", "tgi", "openai", "blyan", "VLLM", "x", ""]))
def test_the_settings_the_admin_api_and_the_stored_fleet_accept_the_same_engines(engine):
    declared = _settings_accept(f"gpu|http://h:1|engine={engine}")
    admitted = _admin_accepts({"name": "gpu", "baseURL": "http://h:1", "engine": engine})
    stored = _stored({"engine": engine})
    assert (declared is None) == (admitted is None) == (stored is None) == (engine not in ENGINES)
    if declared is not None:
        assert declared.engine == admitted["engine"] == stored.engine == engine


@given(st.lists(st.text(alphabet="ab-/:.7 ,|\x01", min_size=1, max_size=12), max_size=4))
def test_the_settings_the_admin_api_and_the_stored_fleet_accept_the_same_models(models):
    assume(all(m == m.strip() and "," not in m for m in models))  # NODE_<n> splits and strips them
    declared = _settings_accept("gpu|http://h:1|models=" + ",".join(models))
    admitted = _admin_accepts({"name": "gpu", "baseURL": "http://h:1", "models": models})
    stored = _stored({"models": models})
    assert (admitted is None) == (stored is None) == (not all(is_model_name(m) for m in models))
    if "|" not in "".join(models):  # a bar would end the field in NODE_<n>
        assert (declared is None) == (admitted is None)
    if admitted is not None:
        assert admitted["models"] == stored.models == tuple(dict.fromkeys(models))


def test_models_and_engine_refusals_name_the_field():
    with pytest.raises(NodeFieldError) as engine:
        node_engine("vLLM")
    assert str(engine.value).startswith("engine must be one of auto, vllm")
    with pytest.raises(NodeFieldError) as models:
        node_models(["a"] * 0 + [f"m{i}" for i in range(65)])
    assert models.value.field == "models"
    assert node_models(("meta-llama/Llama-3.1-8B-Instruct", "llama3:latest")) == (
        "meta-llama/Llama-3.1-8B-Instruct", "llama3:latest")


@given(st.integers(-5, 100005))
def test_the_settings_the_admin_api_and_the_stored_fleet_accept_the_same_caps(cap):
    declared = _settings_accept(f"gpu|http://h:1|max_inflight={cap}")
    admitted = _admin_accepts({"name": "gpu", "baseURL": "http://h:1", "maxInflight": cap})
    stored = _stored({"maxInflight": cap})
    assert (declared is None) == (admitted is None) == (stored is None) == (not 1 <= cap <= 100000)
    if stored is not None:
        assert declared.max_inflight == admitted["max_inflight"] == stored.max_inflight == cap


def test_no_cap_is_null_and_a_bool_is_no_cap_value():
    assert _stored({"maxInflight": None}).max_inflight is None
    assert _stored({}).max_inflight is None
    assert _stored({"maxInflight": True}) is None
    assert _admin_accepts({"name": "gpu", "baseURL": "http://h:1", "maxInflight": None})["max_inflight"] is None


@pytest.mark.parametrize("metadata", [
    {"gpu": "A100"}, {"healthPath": "/ready"}, [], "x", {"healthPath": "/h\r\nX: 1"}, {"healthPath": "//evil/"},
    {"healthPath": 5}, {"blob": "x" * 17000},
])
def test_the_admin_api_and_the_stored_fleet_accept_the_same_metadata(metadata):
    admitted = _admin_accepts({"name": "gpu", "baseURL": "http://h:1", "metadata": metadata})
    try:
        stored = node_from_json({"name": "gpu", "baseURL": "http://h:1", "metadata": metadata})
    except ValueError:
        stored = None
    assert (admitted is None) == (stored is None)


@pytest.mark.parametrize("text, accepted", [
    ("a1b2c3d4e5f60708", True), ("node-1.x:y_z", True), ("x" * 64, True),
    ("", False), ("x" * 65, False), ("n 1", False), ("n1\r\n", False), ("ü", False), ("a/b", False),
])
def test_a_stored_node_id_is_a_word_for_urls_logs_and_etcd_keys(text, accepted):
    try:
        stored = node_from_json({"id": text, "name": "gpu", "baseURL": "http://h:1"})
    except ValueError as refused:
        assert "id must be" in str(refused) and not accepted
    else:
        assert accepted == (stored.id == text)
