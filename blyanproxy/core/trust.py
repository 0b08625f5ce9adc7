"""Whose forwarding headers to believe: ``TRUST_FORWARDED`` and the client's real address.

``X-Forwarded-For`` and friends are only as true as whoever set them. The
proxy believes them when the TCP peer is trusted: everyone (``true``, only
when nothing but a trusted proxy can reach the listener), no one (``false``),
or the peers in a list of addresses and networks (``127.0.0.1,::1`` for an
nginx on the same host). Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

import attrs

from blyanproxy.core.booleans import boolean_word


@attrs.frozen
class ForwardTrust:
    """Which TCP peers may set forwarding headers: ``everyone``, or those in ``networks``."""

    everyone: bool = False
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, value: bool | ForwardTrust) -> ForwardTrust:
        """``value`` itself, or the trust a plain ``True``/``False`` means."""
        return value if isinstance(value, ForwardTrust) else cls(everyone=bool(value))

    def trusts(self, peer: str) -> bool:
        """True when forwarding headers from ``peer`` (an IP address as text) are believed."""
        if self.everyone:
            return True
        if not self.networks:
            return False
        address = _address(peer)
        return address is not None and any(address in network for network in self.networks)

    def __str__(self) -> str:
        if self.everyone or not self.networks:
            return "true" if self.everyone else "false"
        return ",".join(str(network) for network in self.networks)


#: Longer text is no IP address: it is parsed (and refused) without being remembered.
_LONGEST_ADDRESS = 64


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or ``None``; the same few (a proxy in front) come again and again."""
    return _parsed_address(text) if len(text) <= _LONGEST_ADDRESS else None


@functools.lru_cache(maxsize=4096)
def _parsed_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if getattr(address, "scope_id", None) is not None:
        return None  # fe80::1%eth0: the zone is free text (``%x status=200`` would reach the access log)
    # An IPv4 peer on a dual-stack socket reads as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def parse_forward_trust(text: str) -> ForwardTrust:
    """``true``/``false`` (and the other boolean words), or comma-separated addresses and CIDRs."""
    everyone = boolean_word(text)
    if everyone is not None:
        return ForwardTrust(everyone=everyone)
    expected = "expected true, false or addresses/CIDRs such as 127.0.0.1,::1"
    try:
        networks = tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(expected) from None
    if not networks:
        raise ValueError(expected)
    return ForwardTrust(networks=networks)


def _forwarded_for(values: Iterable[bytes]) -> list[str]:
    """Every address listed in ``X-Forwarded-For`` values, left to right."""
    listed: list[str] = []
    for value in values:
        listed.extend(part.strip() for part in value.decode("latin-1").split(",") if part.strip())
    return listed


def origin_address(trust: bool | ForwardTrust, peer: str, forwarded_for: Iterable[bytes]) -> str:
    """The client's real address: ``peer`` unless a trusted peer says otherwise.

    With a trusted peer, ``X-Forwarded-For`` is read from the right, skipping
    addresses that are themselves trusted (a chain of trusted proxies); the
    first other one is the client. Entries that are not IP addresses end the
    walk (a client may write anything on the left). ``everyone`` believes
    only the last hop.
    """
    trust = ForwardTrust.of(trust)
    if not trust.trusts(peer):
        return peer
    found: str | None = None
    for entry in reversed(_forwarded_for(forwarded_for)):
        if _address(entry) is None:
            break
        found = entry
        if trust.everyone or not trust.trusts(entry):
            break
    return found or peer
