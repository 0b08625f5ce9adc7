"""The simulated node's WebSocket echo at ``/ws/echo`` (twisted.web.websocket)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from twisted.python.failure import Failure
    from twisted.web.server import Request
    from twisted.web.websocket import WebSocketTransport

    from blyanproxy.devnode.node import DevNodeStats


class _Echo:
    """A WebSocket protocol (twisted.web.websocket) sending every message straight back."""

    _transport: WebSocketTransport  # given by negotiationStarted, before any message

    def __init__(self, stats: DevNodeStats) -> None:
        self._stats = stats

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        """Keep the transport to answer on."""
        self._transport = transport

    def negotiationFinished(self) -> None:
        """Nothing to do until a message arrives."""

    def textMessageReceived(self, message: str) -> None:
        """Echo a text message."""
        self._stats.websocket_messages += 1
        self._transport.sendTextMessage(message)

    def bytesMessageReceived(self, data: bytes | bytearray) -> None:
        """Echo a binary message."""
        self._stats.websocket_messages += 1
        self._transport.sendBytesMessage(bytes(data))

    def pongReceived(self, payload: bytes) -> None:
        """Pongs need no answer."""

    def connectionLost(self, reason: Failure) -> None:
        """Nothing to release; the node's connection tracking counts the close."""


@attrs.frozen
class EchoFactory:
    """The WebSocket server factory of ``/ws/echo``: one _Echo per connection."""

    stats: DevNodeStats

    def buildProtocol(self, request: Request) -> _Echo:
        """A new echo protocol for an upgraded request."""
        return _Echo(self.stats)
