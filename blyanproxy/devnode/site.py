"""The Site of a DevNode: quiet, counting connections, keeping request header lines in arrival order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

from twisted.internet.interfaces import IProtocol
from twisted.python.components import proxyForInterface
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from blyanproxy.devnode.http import DevNodeResource

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, ITCPTransport, ITransport
    from twisted.python.failure import Failure
    from twisted.web.http import Request as HTTPRequest

    from blyanproxy.devnode.node import DevNode


class _ArrivalHeaders(Headers):
    """Request headers that also keep every (name, value) line added, in order (a ``copy()`` starts
    a new order)."""

    __slots__ = ("arrivals",)

    def __init__(self, rawHeaders: Mapping[bytes, Sequence[bytes]] | None = None) -> None:
        super().__init__(rawHeaders)
        self.arrivals: list[tuple[bytes, bytes]] = []

    def addRawHeader(self, name: str | bytes, value: str | bytes) -> None:
        """Add a header line, remembering its place (a str encoded as Headers encodes it)."""
        super().addRawHeader(name, value)
        self.arrivals.append((
            name.encode("iso-8859-1") if isinstance(name, str) else name,
            value.encode("utf-8") if isinstance(value, str) else value,
        ))


class DevNodeRequest(Request):
    """A twisted.web Request whose headers remember their arrival order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.requestHeaders = _ArrivalHeaders()


def header_lines(request: Request) -> list[tuple[bytes, bytes]]:
    """Every request header line as (name, value): in arrival order under a DevNodeSite, grouped by
    name under another Site (e.g. ``treq.testing.StubTreq(node.resource())``)."""
    headers = request.requestHeaders
    if isinstance(headers, _ArrivalHeaders):
        return list(headers.arrivals)
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


# proxyForInterface builds the base class at run time, which mypy cannot follow (a Twisted typing gap).
class TrackedConnection(proxyForInterface(IProtocol, "_protocol")):  # type: ignore[misc]
    """The Site's protocol for one connection, reporting its start and end to the node.

    It wraps twisted.web's channel from outside, so counting stays right after a WebSocket upgrade
    (which replaces the channel's own ``connectionLost``).
    """

    def __init__(self, protocol: IProtocol, node: DevNode) -> None:
        self._protocol = protocol
        self._node = node
        self.transport: ITransport | None = None

    def makeConnection(self, transport: ITransport) -> None:
        """Count the connection, then hand it to twisted.web."""
        self.transport = transport
        self._node.connection_made(self)
        self._protocol.makeConnection(transport)

    def abort(self) -> None:
        """Drop the connection at once (a node listens on TCP, whose transports abort)."""
        cast("ITCPTransport", self.transport).abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        """Let twisted.web clean up (which cancels this connection's timers), then count the loss."""
        try:
            self._protocol.connectionLost(reason)
        finally:
            self._node.connection_lost(self)


class DevNodeSite(Site):
    """The Site of one DevNode: no access log, quiet, POST bodies left unparsed, connections tracked."""

    noisy = False

    def __init__(self, node: DevNode) -> None:
        super().__init__(
            DevNodeResource(node),
            requestFactory=DevNodeRequest,
            reactor=node.clock,
            parsePOSTFormSubmission=False,
        )
        self._node = node

    def buildProtocol(self, addr: IAddress | None) -> TrackedConnection:
        """twisted.web's protocol for a new connection, wrapped to be tracked."""
        return TrackedConnection(super().buildProtocol(addr), self._node)

    def log(self, request: HTTPRequest) -> None:
        """No access log: the node's stats say what it served."""
