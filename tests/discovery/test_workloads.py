"""Parsing the workloads API's answer, and the nodes of usable workloads."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import formatEvent, globalLogPublisher

from blyanproxy.discovery.nodeallow import parse_node_allow
from blyanproxy.discovery.workloads import (
    NodeAddressing,
    Workload,
    WorkloadsFormatError,
    parse_workloads,
    workload_nodes,
)

ANSWER = [
    {"created": 1, "expires": 2, "node": "gpu-1.example.com", "running": True, "status": "running",
     "type": "ollama_webui:large", "workload": "u-1", "tags": ["large"], "extra": "dropped"},
    {"node": "gpu-2.example.com", "running": True, "status": "starting", "workload": "u-2"},
    {"node": "gpu-3.example.com:8443", "running": True, "status": "running", "workload": "u-3"},
    {"node": "evil.example.com/path?x", "running": True, "status": "running", "workload": "u-4"},
    {"node": "gpu-5.example.com", "running": False, "status": "running", "workload": "u-5"},
]


def test_parse_keeps_known_fields_and_the_api_order():
    workloads = parse_workloads(json.dumps(ANSWER).encode())
    assert [w.workload for w in workloads] == ["u-1", "u-2", "u-3", "u-4", "u-5"]
    assert workloads[0] == Workload(workload="u-1", node="gpu-1.example.com", running=True, status="running",
                                    type="ollama_webui:large", created=1, expires=2, tags=("large",))
    assert workloads[0].as_json()["tags"] == ["large"] and "extra" not in workloads[0].as_json()


def test_usable_workloads_become_nodes_and_names_that_are_not_hosts_are_left_out():
    nodes = workload_nodes(parse_workloads(json.dumps(ANSWER).encode()), NodeAddressing())
    assert [(n.id, n.base_url) for n in nodes] == [
        ("https://gpu-1.example.com", "https://gpu-1.example.com"),
        ("https://gpu-3.example.com:8443", "https://gpu-3.example.com:8443")]
    assert nodes[0].tags == ("large",)


@pytest.mark.parametrize(
    "addressing, node, url",
    [
        (NodeAddressing("http", 8000), "10.0.0.1", "http://10.0.0.1:8000"),
        (NodeAddressing("http", 8000), "10.0.0.1:9000", "http://10.0.0.1:9000"),
        (NodeAddressing("https", 0), "[::1]", "https://[::1]"),
        (NodeAddressing("https", 8443), "[::1]", "https://[::1]:8443"),
    ],
)
def test_node_addressing(addressing, node, url):
    assert addressing.base_url(node) == url


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"{}", b'"x"', b"[1]", b'[{"running": "yes"}]', b'[{"tags": "a"}]',
     b'[{"created": "soon"}]', b'[{"node": 7}]', b"\xff\xfe"],
)
def test_malformed_answers_are_refused(body):
    with pytest.raises(WorkloadsFormatError):
        parse_workloads(body)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4),
                    max_leaves=12))
def test_parse_is_total(document):
    try:
        workloads = parse_workloads(json.dumps(document).encode())
    except WorkloadsFormatError:
        return
    for node in workload_nodes(workloads, NodeAddressing()):
        assert node.base_url.startswith("https://")


@pytest.fixture
def workload_warnings():
    """The text of every blyanproxy.workloads warning logged during the test."""
    seen = []

    def observe(event):
        if event.get("log_namespace") == "blyanproxy.workloads":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def _usable(*names: str) -> tuple[Workload, ...]:
    return tuple(Workload(workload=f"wl-{i}", node=name, running=True, status="running")
                 for i, name in enumerate(names))


@pytest.mark.parametrize("name", ["127.0.0.1:8000", "127.1", "localhost", "[::1]", "169.254.169.254", "0.0.0.0"])
def test_loopback_link_local_and_unspecified_nodes_are_left_out_by_default(name, workload_warnings):
    kept = workload_nodes(_usable("gpu-1.example.com", name, "10.0.0.2"), NodeAddressing("http"))
    assert [node.name for node in kept] == ["gpu-1.example.com", "10.0.0.2"]
    assert [event["workload"] for event in workload_warnings] == ["wl-1"]


def test_a_node_the_allow_list_does_not_allow_is_left_out(workload_warnings):
    allow = parse_node_allow("example.com,10.0.0.0/8")
    kept = workload_nodes(_usable("gpu-1.example.com", "192.168.1.5", "10.1.2.3:8000", "gpu.example.org"),
                          NodeAddressing("http", allow=allow))
    assert [node.base_url for node in kept] == ["http://gpu-1.example.com", "http://10.1.2.3:8000"]
    assert [event["workload"] for event in workload_warnings] == ["wl-1", "wl-3"]
    first = formatEvent(workload_warnings[0])
    assert "WORKLOADS_NODE_ALLOW" in first and "192.168.1.5" in first
