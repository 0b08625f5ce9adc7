"""WORKLOADS_NODE_ALLOW: which discovered node names may be sent a caller's key."""

import pytest

from blyanproxy.config import ConfigError, settings_from
from blyanproxy.discovery.nodeallow import NodeAllowList, parse_node_allow

LOCAL_NAMES = [
    "127.0.0.1", "127.0.0.1:8000", "127.9.9.9", "127.1", "0x7f000001", "2130706433", "0177.0.0.1",
    "localhost", "LOCALHOST:8080", "gpu.localhost", "[::1]", "[::1]:8443", "[::ffff:127.0.0.1]", "::1",
    "169.254.169.254", "169.254.169.254:80", "[fe80::1]", "[::ffff:169.254.169.254]", "0.0.0.0", "0", "[::]",
    "0.1.2.3",
]


@pytest.mark.parametrize("name", LOCAL_NAMES)
def test_the_default_refuses_this_host_and_its_link(name):
    assert not NodeAllowList().allows(name)


@pytest.mark.parametrize("name", ["10.0.0.1", "172.16.5.4:8000", "192.168.1.5", "100.64.0.1", "[fd00::1]",
                                  "8.8.8.8", "[2001:db8::1]:8443", "gpu-1.example.com", "localhost1.example.com"])
def test_private_public_and_named_nodes_are_allowed_by_default(name):
    assert NodeAllowList().allows(name)


ALLOW = parse_node_allow("example.com, .internal.test,10.0.0.0/8, fd00::/8")


@pytest.mark.parametrize(("name", "allowed"), [
    ("example.com", True), ("gpu-1.example.com", True), ("GPU-1.Example.COM:8443", True),
    ("a.b.internal.test", True), ("internal.test", False),  # a leading dot: below it only
    ("10.1.2.3", True), ("10.1.2.3:8000", True), ("[::ffff:10.0.0.1]", True), ("[fd00::5]", True),
    ("badexample.com", False), ("example.com.evil.net", False), ("gpu-1.example.org", False),
    ("192.168.1.5", False), ("11.0.0.1", False), ("[fe80::1]", False),
    ("127.0.0.1", False), ("localhost", False), ("169.254.169.254", False),
])
def test_a_set_allow_list_allows_only_its_suffixes_and_networks(name, allowed):
    assert ALLOW.allows(name) is allowed


def test_loopback_is_allowed_only_when_the_allow_list_names_it():
    loopback = parse_node_allow("127.0.0.1/32")
    assert loopback.allows("127.0.0.1:9000") and not loopback.allows("127.0.0.2:9000")
    assert not loopback.allows("10.0.0.1") and not loopback.allows("localhost")
    assert parse_node_allow("localhost").allows("localhost:8000")


def test_the_allow_list_reads_back_as_it_was_written():
    assert str(ALLOW) == "example.com,.internal.test,10.0.0.0/8,fd00::/8"
    assert str(NodeAllowList()) == ""
    assert parse_node_allow(str(ALLOW)) == ALLOW


@pytest.mark.parametrize("text", ["", " , ", "example.com,,10.0.0.0/8", "10.0.0.1/8", "10.0.0.0/33",
                                  "exa mple.com", "http://example.com", "*.example.com", "example.com:8000",
                                  "-example.com", "[::1]", "1.2.3.4.5/8"])
def test_malformed_allow_lists_are_refused(text):
    with pytest.raises(ValueError):
        parse_node_allow(text)


def test_the_setting_reads_the_list_and_names_itself_when_malformed():
    settings = settings_from({"WORKLOADS_NODE_ALLOW": "example.com, 10.0.0.0/8"}, {})
    assert settings.workloads_node_allow == parse_node_allow("example.com,10.0.0.0/8")
    assert settings_from({}, {}).workloads_node_allow == NodeAllowList()
    with pytest.raises(ConfigError, match="WORKLOADS_NODE_ALLOW: '10.0.0.1/8' is not a network"):
        settings_from({"WORKLOADS_NODE_ALLOW": "10.0.0.1/8"}, {})
