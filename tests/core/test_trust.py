"""TRUST_FORWARDED: which peers may set forwarding headers, and the client's real address."""

import pytest

from blyanproxy.config import ConfigError, settings_from
from blyanproxy.core.headers import ClientFacts, upstream_request_headers
from blyanproxy.core.trust import ForwardTrust, origin_address, parse_forward_trust

NGINX = parse_forward_trust("127.0.0.1,::1")


@pytest.mark.parametrize("text, everyone", [("true", True), ("YES", True), ("1", True), ("false", False),
                                           ("off", False), ("0", False)])
def test_boolean_words_keep_their_meaning(text, everyone):
    assert parse_forward_trust(text) == ForwardTrust(everyone=everyone)


def test_addresses_and_networks():
    trust = parse_forward_trust(" 127.0.0.1 , 10.1.0.0/16,::1,fd00::/8 ")
    assert [trust.trusts(a) for a in ("127.0.0.1", "10.1.200.3", "::1", "fd00::5")] == [True] * 4
    assert [trust.trusts(a) for a in ("127.0.0.2", "10.2.0.1", "::2", "unknown", "")] == [False] * 5
    assert str(trust) == "127.0.0.1/32,10.1.0.0/16,::1/128,fd00::/8"


def test_an_ipv4_peer_seen_through_a_dual_stack_socket_matches_its_ipv4_entry():
    assert NGINX.trusts("::ffff:127.0.0.1")


@pytest.mark.parametrize("text", ["", " , ", "maybe", "127.0.0.1,nginx", "10.0.0.0/33"])
def test_anything_else_is_refused(text):
    with pytest.raises(ValueError):
        parse_forward_trust(text)


def test_the_setting_names_itself_on_a_bad_value():
    with pytest.raises(ConfigError, match=r"TRUST_FORWARDED: .*'nginx'"):
        settings_from({"TRUST_FORWARDED": "nginx"}, {})
    assert settings_from({"TRUST_FORWARDED": "127.0.0.1"}, {}).trust_forwarded == parse_forward_trust("127.0.0.1")
    assert settings_from({}, {}).trust_forwarded == ForwardTrust()


@pytest.mark.parametrize(
    "trust, peer, header, expected",
    [
        (NGINX, "127.0.0.1", [b"203.0.113.7"], "203.0.113.7"),
        (NGINX, "127.0.0.1", [b"6.6.6.6, 203.0.113.7"], "203.0.113.7"),  # forged entry on the left
        (NGINX, "127.0.0.1", [b"203.0.113.7, 127.0.0.1"], "203.0.113.7"),  # a chain of trusted hops
        (NGINX, "127.0.0.1", [b"6.6.6.6", b"203.0.113.7"], "203.0.113.7"),  # repeated header lines
        (NGINX, "127.0.0.1", [b"not-an-ip, 203.0.113.7"], "203.0.113.7"),
        (NGINX, "127.0.0.1", [b"203.0.113.7, junk"], "127.0.0.1"),
        (NGINX, "127.0.0.1", [], "127.0.0.1"),
        (NGINX, "198.51.100.9", [b"203.0.113.7"], "198.51.100.9"),  # untrusted peer: ignored
        (ForwardTrust(), "127.0.0.1", [b"203.0.113.7"], "127.0.0.1"),
        (True, "198.51.100.9", [b"6.6.6.6, 203.0.113.7"], "203.0.113.7"),
        (False, "198.51.100.9", [b"203.0.113.7"], "198.51.100.9"),
    ],
)
def test_origin_address(trust, peer, header, expected):
    assert origin_address(trust, peer, header) == expected


def _headers(peer: str, trust) -> dict:
    incoming = [(b"X-Forwarded-For", [b"203.0.113.7"]), (b"X-Real-IP", [b"203.0.113.7"]),
                (b"X-Forwarded-Proto", [b"https"])]
    out = upstream_request_headers(incoming, b"node:1", ClientFacts(peer, b"http", b"proxy"), trust_forwarded=trust)
    return {name.lower(): values for name, values in out}


def test_forwarded_headers_are_kept_only_from_a_trusted_peer():
    trusted = _headers("127.0.0.1", NGINX)
    assert trusted[b"x-forwarded-for"] == [b"203.0.113.7, 127.0.0.1"]
    assert trusted[b"x-real-ip"] == [b"203.0.113.7"]
    assert trusted[b"x-forwarded-proto"] == [b"https"]
    stranger = _headers("198.51.100.9", NGINX)
    assert stranger[b"x-forwarded-for"] == [b"198.51.100.9"]
    assert b"x-real-ip" not in stranger
    assert stranger[b"x-forwarded-proto"] == [b"http"]


def test_an_ipv6_zone_or_an_overlong_entry_is_no_address_and_ends_the_walk():
    from blyanproxy.core.trust import _parsed_address

    trust = parse_forward_trust("127.0.0.1")
    assert origin_address(trust, "127.0.0.1", [b"6.6.6.6, fe80::1%x status=200 node=evil"]) == "127.0.0.1"
    assert origin_address(trust, "127.0.0.1", [b"fe80::1"]) == "fe80::1"
    before = _parsed_address.cache_info().currsize
    for n in range(50):  # client-chosen text is never remembered past the length of an address
        assert origin_address(trust, "127.0.0.1", [b"1" * 70 + b"%d" % n]) == "127.0.0.1"
    assert _parsed_address.cache_info().currsize == before
