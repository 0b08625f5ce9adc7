"""TCP keep-alive probes on a spliced WebSocket's two connections, so a vanished peer is noticed."""

from __future__ import annotations

import socket
from typing import Any


def enable_keepalive_probes(transport: object, idle: float) -> None:
    """Turn on TCP keep-alive probes after ``idle`` quiet seconds, so a vanished peer is noticed.

    The probes work below WebSocket framing, which the proxy passes through
    untouched. ``transport`` may be TLS over TCP; the TCP one is found below it.
    """
    tcp: Any = transport  # found by what it can do: TLS keeps the transport it wraps as ``.transport``
    while tcp is not None and not hasattr(tcp, "setTcpKeepAlive"):
        tcp = getattr(tcp, "transport", None)
    if tcp is None:
        return
    tcp.setTcpKeepAlive(True)
    sock = tcp.getHandle()
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(idle / 3, 1)), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), max(int(value), 1))
