"""The proxy's listening port: bound at start-up, and a port that cannot be had is one line and exit 1.

``Listener`` listens from ``privilegedStartService`` (before twistd drops
privileges and before the reactor runs). TCP, UNIX, TLS and adopted sockets
listen at once, so a refusal (a port in use, an address not on this host, a
socket path that cannot be made) is one critical log line naming the endpoint
and the reason, then ``SystemExit(1)``: no traceback. ``on_listening`` is
called with the bound address once the port is open (the start-up summary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.application.service import Service
from twisted.internet import defer

from blyanproxy.logs import logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
    from twisted.python.failure import Failure

log = logger("listen")


def cannot_listen(description: str, failure: Failure) -> SystemExit:
    """Log why ``description`` (a strports text) cannot be listened on; the ``SystemExit`` to raise then."""
    error = getattr(failure.value, "socketError", None)  # CannotListenError: the socket's own error
    reason = getattr(error, "strerror", None) or failure.getErrorMessage()
    log.critical("cannot listen on {listen}: {reason}", listen=description, reason=reason)
    return SystemExit(1)


#: strports endpoint types whose description takes a ``backlog=`` (TCP, TLS and UNIX listeners).
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int) -> str:
    """``description`` (strports) listening with ``backlog``, unless it names a backlog itself.

    Twisted listens with a backlog of 50 unless told; endpoint types that take
    no backlog (adopted descriptors, systemd's) are left as they are.
    """
    kind = description.partition(":")[0].lower()
    if kind not in _BACKLOG_TYPES or any(part.startswith("backlog=") for part in description.split(":")[1:]):
        return description
    return f"{description}:backlog={backlog}"


def address_text(port: IListeningPort) -> str:
    """Where a listening port is: ``host:port`` for TCP (``[::1]:9000`` for IPv6), the path for UNIX."""
    address = port.getHost()
    host, number = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and number is not None:
        return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"
    name = getattr(address, "name", address)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


class Listener(Service):
    """Listens on ``endpoint`` with ``factory`` while running (see the module docstring).

    ``description`` is what the operator wrote (``LISTEN``/``--port``), for
    messages. ``port`` is the listening port once open.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, description: str,
                 on_listening: Callable[[str], None] = lambda address: None) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._description = description
        self._on_listening = on_listening
        self._listening: defer.Deferred[IListeningPort] | None = None
        self._starting = False
        self._refused_now = False
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Listen now; ``SystemExit`` with one line when the endpoint refuses."""
        super().privilegedStartService()
        self._starting = True
        self._listening = self._endpoint.listen(self._factory)
        self._listening.addCallbacks(self._listened, self._refused)
        self._starting = False
        if self._refused_now:
            raise SystemExit(1)  # cannot_listen has said why

    def startService(self) -> None:
        """Listen, if ``privilegedStartService`` has not yet."""
        if self._listening is None:
            self.privilegedStartService()
        super().startService()

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self._on_listening(address_text(port))

    def _refused(self, failure: Failure) -> None:
        cannot_listen(self._description, failure)
        # An endpoint that listens later (none of twistd's stream endpoints) leaves the process
        # running without its port; one that refuses at once ends start-up.
        self._refused_now = self._starting

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening (connections already open stay)."""
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            stopped = port.stopListening()
            return stopped if stopped is not None else defer.succeed(None)
        if listening is not None:
            listening.cancel()
        return defer.succeed(None)
