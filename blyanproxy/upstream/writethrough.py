"""Writing to a TCP transport without waiting for the next turn of the reactor.

Twisted queues every ``transport.write`` and sends it when the reactor next
finds the socket writable: two ``epoll_ctl`` calls and a reactor pass per
write. For token streams (one small write per event) that is most of the
cost. ``write_through(transport)`` returns a write function that sends at
once when nothing is queued, as asyncio's transports do, and otherwise (or
for what the kernel did not take) falls back to the transport's own
``write``, so ordering, flow control and error handling stay Twisted's.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import tcp

from blyanproxy.twistedinternals import nothing_queued


def write_through(transport) -> Callable[[bytes], None]:
    """A ``write(data)`` for ``transport`` that sends immediately when it can.

    Only plain TCP transports are sent to directly; anything else (TLS, test
    transports) gets its own ``write`` back.
    """
    if not isinstance(transport, tcp.Connection):
        return transport.write
    send = transport.socket.send
    queued_write = transport.write

    def write(data: bytes) -> None:
        if not nothing_queued(transport):
            queued_write(data)
            return
        try:
            sent = send(data)
        except OSError:  # EAGAIN, or an error Twisted will find and report on its own write
            sent = 0
        if sent < len(data):
            queued_write(data[sent:])

    return write
