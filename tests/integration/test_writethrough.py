"""write_through keeps bytes in order over a real socket, whether the kernel takes them or not."""

import hashlib

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from blyanproxy.upstream.writethrough import write_through

from .rawhttp import connect, eventually, sleep


def test_other_transports_keep_their_own_write():
    transport = StringTransport()
    assert write_through(transport) == transport.write


@pytest_twisted.ensureDeferred
async def test_bytes_arrive_in_order_through_a_full_socket(reactor):
    sent = hashlib.sha256()
    server_side = Deferred()

    class Writer(Protocol):
        def connectionMade(self):
            server_side.callback(self.transport)

    port = reactor.listenTCP(0, Factory.forProtocol(Writer), interface="127.0.0.1")
    try:
        client = await connect(reactor, f"http://127.0.0.1:{port.getHost().port}")
        transport = await server_side
        write = write_through(transport)
        client.transport.pauseProducing()  # the reader stops: the socket fills up
        total = 0
        for index in range(400):
            piece = bytes([index % 251]) * (16 * 1024 + index)
            sent.update(piece)
            total += len(piece)
            write(piece)
        await sleep(reactor, 0.2)
        assert transport.dataBuffer or transport._tempDataLen  # some had to be queued
        client.transport.resumeProducing()
        await eventually(reactor, lambda: len(client.received) == total, timeout=10)
        assert hashlib.sha256(client.received).hexdigest() == sent.hexdigest()
        client.transport.loseConnection()
    finally:
        await port.stopListening()
