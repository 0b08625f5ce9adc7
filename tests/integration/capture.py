"""A simulated node that also records the exact bytes each connection brought it.

Hostile-input tests check what reached the node, not just what the client saw:
``strict_requests`` reads the recording back and fails on anything that is not
a sequence of clean HTTP/1.1 requests, each framed by one ``Content-Length``.
"""

from __future__ import annotations

import re

import attrs
import pytest_twisted
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from blyanproxy.devnode import DevNode, DevNodeConfig

_REQUEST_LINE = re.compile(rb"[A-Z]+ /[!-~]* HTTP/1\.1\Z")
_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [\t -~\x80-\xff]*\Z")


class _Recording(ProtocolWrapper):
    def __init__(self, factory, wrapped) -> None:
        super().__init__(factory, wrapped)
        self.received = b""
        factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        super().dataReceived(data)


class _RecordingFactory(WrappingFactory):
    protocol = _Recording
    noisy = False

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self.connections: list[_Recording] = []


@attrs.define
class CaptureNode:
    """A DevNode on 127.0.0.1 whose connections' raw bytes are kept (``received``)."""

    node: DevNode
    factory: _RecordingFactory
    listening: object

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listening.getHost().port}"

    @property
    def received(self) -> list[bytes]:
        """What each connection received, in connection order."""
        return [connection.received for connection in self.factory.connections]

    def stop(self):
        stopped = maybeDeferred(self.listening.stopListening)
        return stopped.addCallback(lambda _: self.node.disconnect_all())


def strict_requests(stream: bytes) -> list[tuple[bytes, list[tuple[bytes, bytes]], bytes]]:
    """Split one connection's bytes into ``(request line, headers, body)``; AssertionError if unclean.

    Clean means: CRLF line ends only, a well-formed request line and header
    lines, one ``Host``, no ``Transfer-Encoding``, at most one ``Content-Length``
    and exactly that many body bytes, nothing left over.
    """
    requests = []
    while stream:
        head, sep, stream = stream.partition(b"\r\n\r\n")
        assert sep, f"an unterminated head reached the node: {head[:200]!r}"
        lines = head.split(b"\r\n")
        assert b"\n" not in head.replace(b"\r\n", b"") and b"\r" not in head.replace(b"\r\n", b""), head
        assert _REQUEST_LINE.match(lines[0]), f"bad request line at the node: {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            assert _HEADER_LINE.match(line), f"bad header line at the node: {line!r}"
            name, _, value = line.partition(b": ")
            headers.append((name.lower(), value))
        names = [name for name, _ in headers]
        assert names.count(b"host") == 1, headers
        assert b"transfer-encoding" not in names, headers
        lengths = [value for name, value in headers if name == b"content-length"]
        assert len(lengths) <= 1 and all(v.isdigit() for v in lengths), headers
        length = int(lengths[0]) if lengths else 0
        assert len(stream) >= length, "a body shorter than its Content-Length reached the node"
        requests.append((lines[0], headers, stream[:length]))
        stream = stream[length:]
    return requests


@pytest_twisted.async_yield_fixture()
async def capture_node(reactor):
    """Start recording DevNodes: ``capture_node(**DevNodeConfig fields) -> CaptureNode``."""
    started: list[CaptureNode] = []

    def start(**config) -> CaptureNode:
        node = DevNode(DevNodeConfig(**config), reactor)
        factory = _RecordingFactory(node.site())
        started.append(CaptureNode(node, factory, reactor.listenTCP(0, factory, interface="127.0.0.1")))
        return started[-1]

    yield start
    await gatherResults([node.stop() for node in started], consumeErrors=True).addTimeout(5, reactor)
