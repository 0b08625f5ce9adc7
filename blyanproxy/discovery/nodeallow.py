"""Which discovered nodes the proxy may send a caller's key to: ``WORKLOADS_NODE_ALLOW``.

A workloads API names each workload's node (``host[:port]``); the proxy then
sends that node the caller's requests, key included. ``NodeAllowList`` keeps
such names off this host and its link (loopback, link-local, unspecified,
``localhost``) by default, or to the host suffixes and networks an operator
lists. Pure values, no I/O: names are judged as written, never resolved.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Union

import attrs

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: One host-suffix entry of WORKLOADS_NODE_ALLOW: DNS labels, a leading dot for "below it only".
_SUFFIX = re.compile(r"\.?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\Z")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # 0.0.0.0 reaches this host itself


def _host_of(node_name: str) -> str | Address:
    """The host of ``host[:port]`` or ``[v6][:port]``: an address, or a lower-case name.

    A name the system resolver reads as an IPv4 address (``127.1``, ``0x7f000001``,
    ``2130706433``, octal ``0177.0.0.1``) is that address, as a connection would find.
    """
    if node_name.startswith("["):
        return ipaddress.ip_address(node_name[1:].split("]", 1)[0])
    if node_name.count(":") > 1:
        return ipaddress.ip_address(node_name)  # an IPv6 address without brackets
    host = node_name.rsplit(":", 1)[0].lower()
    if re.fullmatch(r"[0-9a-fx.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    return host


def _unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_local(host: str | Address) -> bool:
    """This host or its link: loopback, link-local, unspecified (``0.0.0.0/8``, ``::``), ``localhost``."""
    if isinstance(host, str):
        return host == "localhost" or host.endswith(".localhost")
    return host.is_loopback or host.is_link_local or host.is_unspecified or host in _THIS_NETWORK


def _below(name: str, suffix: str) -> bool:
    """``name`` is ``suffix`` or below it; below it only for a suffix with a leading dot."""
    if suffix.startswith("."):
        return name.endswith(suffix)
    return name == suffix or name.endswith("." + suffix)


@attrs.frozen
class NodeAllowList:
    """Which discovered nodes may be sent a caller's key: ``WORKLOADS_NODE_ALLOW``.

    Empty (unset): any node but loopback, link-local and unspecified addresses and
    ``localhost`` names; private ranges are allowed. Set: only a name ending in one
    of ``suffixes`` (``example.com`` allows it and every name below it,
    ``.example.com`` only the names below it) or an address in one of ``networks``,
    loopback included only when listed. Names are judged as written, never resolved.
    """

    suffixes: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    def allows(self, node_name: str) -> bool:
        """Whether a workload's ``node`` (``host[:port]``, ``[v6][:port]``) may be used."""
        try:
            host = _host_of(node_name)
        except ValueError:
            return False
        if not isinstance(host, str):
            host = _unmapped(host)
        if not self.suffixes and not self.networks:
            return not _is_local(host)
        if isinstance(host, str):
            return any(_below(host, suffix) for suffix in self.suffixes)
        return any(host in network for network in self.networks)

    def __str__(self) -> str:
        return ",".join([*self.suffixes, *map(str, self.networks)])


def parse_node_allow(text: str) -> NodeAllowList:
    """``WORKLOADS_NODE_ALLOW``: comma-separated host suffixes and CIDRs (``ValueError`` if malformed)."""
    suffixes: list[str] = []
    networks: list[Network] = []
    for entry in (part.strip().lower() for part in text.split(",")):
        if not entry:
            raise ValueError("an entry is empty (expected host suffixes and CIDRs, comma-separated)")
        if re.search(r"[/:]", entry) or re.fullmatch(r"[0-9.]+", entry):
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a network: {exc}") from None
        elif _SUFFIX.match(entry):
            suffixes.append(entry)
        else:
            raise ValueError(f"{entry!r} is neither a host suffix (example.com, .example.com) nor a CIDR")
    return NodeAllowList(tuple(suffixes), tuple(networks))


