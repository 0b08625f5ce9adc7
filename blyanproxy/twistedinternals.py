"""Every use of a private Twisted API, in one place.

Twisted does not promise to keep these names; each entry names the Twisted
version it was checked against and what to do if it changes. After a Twisted
upgrade, re-check each entry, run the integration tests (WebSocket, hostile
HTTP, write-through, health checks) and update the versions named here.
Nothing else in ``blyanproxy`` reaches for an underscore name of Twisted's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import IProtocol
from twisted.web import http
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

if TYPE_CHECKING:
    # A type only (TLS trust roots in upstream.endpoints): Twisted 26.10 exports this interface
    # from no public module. If it moves, import it from its new home here.
    from twisted.internet._sslverify import IOpenSSLTrustRoot as IOpenSSLTrustRoot

# -- twisted.web.http: the server's HTTP/1.1 channel ----------------------------------------------


def take_over_connection(channel: http.HTTPChannel, protocol: IProtocol) -> None:
    """Give the channel's raw connection to ``protocol`` (every byte, and the connection's loss).

    Checked: Twisted 26.10.0, ``HTTPChannel._protocolUpgradeForWebsockets``, the hook
    Twisted's own ``twisted.web.websocket`` uses. If it changes: use Twisted's public
    upgrade API if there is one by then; else swap ``channel.dataReceived`` and
    ``channel.connectionLost`` for the protocol's and call ``protocol.makeConnection``
    with the channel's transport, as that method does.
    """
    channel._protocolUpgradeForWebsockets(protocol)


class BodyDecoder(Protocol):
    """A decoder of one HTTP/1.1 body framing: ``dataReceived(bytes)``, then ``noMoreData()``."""

    def dataReceived(self, data: bytes) -> None:
        """Decode more bytes of the body."""

    def noMoreData(self) -> None:
        """The connection ended; raises when the body was cut short."""


def body_decoder(length: int | None, chunked: bool, write: Callable[[bytes], None],
                 done: Callable[[bytes], None]) -> BodyDecoder:
    """A decoder for a chunked body, one of ``length`` bytes, or (``length`` None) one ended by a close.

    ``write(data)`` gets the decoded body; ``done(extra)`` is called once it is complete.

    Checked: Twisted 26.10.0, ``twisted.web.http._ChunkedTransferDecoder(write, done)`` and
    ``_IdentityTransferDecoder(length, write, done)``. If they change: decode with
    ``blyanproxy.upstream``'s own ``ChunkedBody`` and a byte count instead.
    """
    if chunked:
        return http._ChunkedTransferDecoder(write, done)
    if length is None:
        return _UntilClose(write, done)
    return http._IdentityTransferDecoder(length, write, done)


class _UntilClose:
    """A body ended by the connection's close: complete when the connection ends, never cut short.

    (Twisted's ``_IdentityTransferDecoder(None, …)`` raises ``PotentialDataLoss`` there.)
    """

    def __init__(self, write: Callable[[bytes], None], done: Callable[[bytes], None]) -> None:
        self._write = write
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        self._write(data)

    def noMoreData(self) -> None:
        self._done(b"")


class ChannelWithBadRequestHook(http.HTTPChannel):
    """``HTTPChannel`` whose answer to a head it cannot parse is ``bad_request()``, a public name.

    Checked: Twisted 26.10.0 calls ``HTTPChannel._respondToBadRequestAndDisconnect`` for a
    malformed request line, header or framing. If it is renamed: override the new name
    here; if it goes, override ``lineReceived``/``headerReceived`` errors instead (the
    hostile-HTTP integration tests show which answers must stay JSON).
    """

    def bad_request(self) -> None:
        """Answer a request that is not valid HTTP/1.1 and close (default: Twisted's bare 400)."""
        super()._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()


def request_line_target(channel: http.HTTPChannel) -> bytes | None:
    """The target of the request line whose head the channel is reading, None before one arrived.

    Checked: Twisted 26.10.0, ``HTTPChannel._path`` (set from the request line in
    ``lineReceived``, deleted in ``allContentReceived``). If it changes: return None
    (a refusal before the request is parsed then takes the proxy's plain error shape).
    """
    target = getattr(channel, "_path", None)
    return target if isinstance(target, bytes) else None


def channel_protocol(channel: http.HTTPChannel) -> IProtocol:
    """The protocol a ``Site`` serves a connection with: Twisted's wrapper around ``channel``.

    Checked: Twisted 26.10.0, ``twisted.web.http._GenericHTTPChannelProtocol`` (what
    ``HTTPFactory.protocol`` builds; it negotiates HTTP/2 when that is installed). If it
    changes: return what ``http.HTTPFactory.buildProtocol`` wraps its channel in.
    """
    return http._GenericHTTPChannelProtocol(channel)


# -- twisted.internet.tcp: a connection's write buffer --------------------------------------------


def nothing_queued(transport: tcp.Connection) -> bool:
    """True when a TCP connection has nothing waiting to be written and may be written to now.

    Checked: Twisted 26.10.0, ``FileDescriptor._tempDataLen`` (bytes written since the
    buffer was last joined) and ``_writeDisconnected`` (the write side is shut). If they
    change: answer False here, so every write takes Twisted's own queued path (slower,
    never wrong).
    """
    return not (
        transport.dataBuffer
        or transport._tempDataLen
        or transport.disconnecting
        or transport._writeDisconnected
        or not transport.connected
    )


# -- twisted.web.client: the Agent's connection pool ----------------------------------------------


class _QuietClientFactory(_HTTP11ClientFactory):
    """The Agent pool's protocol factory, without two log lines per connection."""

    noisy = False


def quiet_connection_pool(reactor: Any, persistent: bool) -> HTTPConnectionPool:
    """An ``HTTPConnectionPool`` that does not log every connection it opens and closes.

    Checked: Twisted 26.10.0, ``HTTPConnectionPool._factory`` (the protocol factory class)
    and ``twisted.web.client._HTTP11ClientFactory``. If they change: return a plain pool
    (only log lines are lost).
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    return pool
