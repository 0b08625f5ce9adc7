"""What the pure rules read of a twisted.web request, as a typing ``Protocol``.

Core stays free of Twisted: a ``twisted.web.server.Request`` fits these
shapes, and so does any test double with the same few members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class RequestHeaders(Protocol):
    """The header lookups the rules use on twisted.web's ``Headers``."""

    def getRawHeaders(self, name: bytes, default: list[bytes]) -> Sequence[bytes]:
        """Every value of ``name``, or ``default``."""


class PeerAddress(Protocol):
    """The client's address as twisted.web reports it (``IPv4Address`` and friends)."""

    @property
    def host(self) -> str:
        """The address as text."""


class RequestView(Protocol):
    """The parts of a request that routing, affinity and forwarding headers read."""

    @property
    def uri(self) -> bytes:
        """The request target as sent."""

    @property
    def requestHeaders(self) -> RequestHeaders:
        """Every request header."""

    @property
    def received_cookies(self) -> dict[bytes, bytes]:
        """Cookies the client sent."""

    def getHeader(self, key: bytes) -> bytes | None:
        """The last value of a header, or None."""

    def isSecure(self) -> bool:
        """Whether the client connection is TLS."""

    def getClientAddress(self) -> object:
        """The client's address (an object with ``host`` for TCP)."""
