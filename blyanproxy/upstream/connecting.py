"""Making one connection to a node: through an endpoint, or with ``connectTCP`` itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IConnector, IStreamClientEndpoint
    from twisted.python.failure import Failure

_P = TypeVar("_P", bound=Protocol)


class OneConnection(ClientFactory):
    """Builds the one protocol given, without a log line per connection.

    Given to ``connectTCP`` with a ``connected`` Deferred (the protocol fires
    it from ``connectionMade``), it fails that Deferred with the reason the
    connection could not be made, unless it was cancelled.
    """

    noisy = False

    def __init__(self, protocol: Protocol, connected: defer.Deferred[Any] | None = None) -> None:
        self._protocol = protocol
        self._connected = connected

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if self._connected is not None and not self._connected.called:
            self._connected.errback(reason)


def connect_quietly(endpoint: IStreamClientEndpoint, protocol: _P) -> defer.Deferred[_P]:
    """``endpoint.connect`` for one ready-made protocol; fires with it once connected."""
    # An endpoint fires with the protocol its factory built (a TLS endpoint with the wrapped one).
    return cast("defer.Deferred[_P]", endpoint.connect(OneConnection(protocol)))
