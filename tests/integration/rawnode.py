"""A node that answers every request head with bytes the test chooses, and records what it got.

For answers no real server would send (a ``101`` to a plain GET, chunk
extensions with a bare CR, control characters in trailers): ``raw_node(answer)``
listens on 127.0.0.1:0; ``answer(head)`` gives the bytes for one request head
(request line and headers, without the blank line). Request bodies are not
read: tests send heads only.
"""

from __future__ import annotations

from typing import Callable

import pytest_twisted
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.protocol import Factory, Protocol


class _RawNodeConnection(Protocol):
    def __init__(self, node: RawNode) -> None:
        self.node = node
        self.received = b""
        self._unanswered = b""

    def connectionMade(self) -> None:
        self.node.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._unanswered += data
        while b"\r\n\r\n" in self._unanswered:
            head, _, self._unanswered = self._unanswered.partition(b"\r\n\r\n")
            self.transport.write(self.node.answer(head))


class RawNode(Factory):
    """Listens on 127.0.0.1; ``connections`` in order, each with what it ``received``."""

    noisy = False

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.connections: list[_RawNodeConnection] = []
        self.listening = None

    def buildProtocol(self, addr) -> Protocol:
        return _RawNodeConnection(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listening.getHost().port}"

    @property
    def received(self) -> list[bytes]:
        """What each connection received, in connection order."""
        return [connection.received for connection in self.connections]

    def stop(self):
        stopped = maybeDeferred(self.listening.stopListening)
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
        return stopped


@pytest_twisted.async_yield_fixture()
async def raw_node(reactor):
    """Start raw nodes: ``raw_node(answer) -> RawNode`` (``answer(head) -> bytes``)."""
    started: list[RawNode] = []

    def start(answer: Callable[[bytes], bytes]) -> RawNode:
        node = RawNode(answer)
        node.listening = reactor.listenTCP(0, node, interface="127.0.0.1")
        started.append(node)
        return node

    yield start
    await gatherResults([node.stop() for node in started], consumeErrors=True).addTimeout(5, reactor)
