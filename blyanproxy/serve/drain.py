"""Graceful stop: stop accepting, let open requests and streams finish, then stop the rest.

``ConnectionTracker`` is the listening factory: it knows every open client
connection and the requests under way on it (a WebSocket stays under way
until its connection closes). ``Drainer`` is the proxy's top service; when
twistd stops it (SIGTERM, SIGINT) it

1. stops the listener, so no new connection is accepted;
2. closes idle keep-alive connections and asks each busy one to close after
   its current response (``Connection: close``);
3. waits until every connection has closed, at most ``grace`` seconds, then
   aborts the stragglers;
4. saves the fleet, then stops its other children (health checks, the
   upstream pool) in reverse order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from blyanproxy.logs import logger
from blyanproxy.upstream import write_through

if TYPE_CHECKING:
    from collections.abc import Iterable

    from twisted.internet.interfaces import IReactorTime, ITCPTransport, ITransport
    from twisted.web.server import Request

    from blyanproxy.serve.site import ProxySite

log = logger("drain")

#: Seconds to wait for aborted connections to report their end before stopping anyway.
ABORT_SETTLE = 5.0


class TrackedConnection(ProtocolWrapper):
    """One client connection as the tracker sees it; it is the channel's transport.

    What the channel writes (response heads, bodies, stream events) goes out
    at once when nothing is queued (``upstream.write_through``), not on the
    reactor's next turn.
    """

    _held: list[bytes] | None = None  # while ``hold`` lasts: what was written

    def makeConnection(self, transport: ITransport) -> None:
        """Connected: writes go straight to ``transport`` when they can."""
        self._send = write_through(transport)
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        """Send ``data`` to the client."""
        if self._held is not None:
            self._held.append(data)
        else:
            self._send(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Send the pieces of ``data`` to the client, as one write."""
        self.write(b"".join(data))

    def hold(self) -> None:
        """Keep what is written until ``release``, then send it as one write."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Send what was written since ``hold``."""
        held, self._held = self._held, None
        if held:
            self._send(b"".join(held))


class ConnectionTracker(WrappingFactory):
    """Wraps the ``Site``: tracks open connections and the requests under way on each.

    The site's request class calls ``request_started`` once a request's head
    has arrived (``ProxySite.on_request``).
    """

    noisy = False  # no "Starting factory" / "Stopping factory" lines in the log
    protocol = TrackedConnection

    def __init__(self, site: ProxySite) -> None:
        super().__init__(site)
        site.on_request = self.request_started
        self.draining = False
        # Keyed by connection: the ProtocolWrapper that is the channel's transport.
        self._active: dict[object, set[Request]] = {}
        self._all_closed: defer.Deferred[None] | None = None

    def request_started(self, request: Request) -> None:
        """A request's head arrived on one of our connections."""
        connection = request.channel.transport
        self._active.setdefault(connection, set()).add(request)
        request.notifyFinish().addBoth(self._request_ended, connection, request)
        if self.draining:
            _close_after(request)

    def _request_ended(self, result: object, connection: object, request: Request) -> None:
        self._active.get(connection, set()).discard(request)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        """A connection closed: forget it, and fire the drain's Deferred after the last one."""
        super().unregisterProtocol(p)
        self._active.pop(p, None)
        if self._all_closed is not None and not self.protocols:
            waiting, self._all_closed = self._all_closed, None
            if not waiting.called:  # not given up on after the grace
                waiting.callback(None)

    def busy(self) -> int:
        """Requests under way (WebSockets included)."""
        return sum(len(requests) for requests in self._active.values())

    def drain(self) -> defer.Deferred[None]:
        """Close idle connections now and busy ones after their response; fires once all are closed."""
        self.draining = True
        closed: defer.Deferred[None] = defer.Deferred()
        if not self.protocols:
            closed.callback(None)
            return closed
        self._all_closed = closed
        for connection in list(self.protocols):
            requests = self._active.get(connection)
            if requests:
                for request in list(requests):
                    _close_after(request)
            else:
                connection.loseConnection()
        return closed

    def abort_all(self) -> int:
        """Cut every connection still open; returns how many there were."""
        connections: list[ProtocolWrapper] = list(self.protocols)
        for connection in connections:
            cast("ITCPTransport", connection.transport).abortConnection()  # TCP, or TLS over TCP
        return len(connections)


def _close_after(request: Request) -> None:
    """Close the request's connection once its response has ended, and say so if not yet sent."""
    if request.channel is not None:
        request.channel.persistent = False
    if not request.startedWriting:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])


class Drainer(MultiService):
    """The top service of one proxy process: starts its children in order, stops them gracefully.

    The listener (added with ``add_listener``, after the services it needs)
    is stopped first; ``save`` (the fleet keeper's, or None) runs once the
    drain is over, before the other children stop.
    """

    def __init__(self, tracker: ConnectionTracker, clock: IReactorTime, grace: float,
                 save: Callable[[], object] | None = None) -> None:
        super().__init__()
        self._tracker = tracker
        self._clock = clock
        self._grace = grace
        self._save = save
        self.listener: IService | None = None
        self.before_drain: Callable[[], object] | None = None  # called as the drain begins

    def add_listener(self, listener: IService) -> None:
        """Add the listening service: started last, stopped first."""
        listener.setServiceParent(self)
        self.listener = listener

    def stopService(self) -> defer.Deferred[list[object]]:
        """Stop the listener, drain, save, then stop the other children (last added first)."""
        Service.stopService(self)
        stopping = defer.maybeDeferred(self.listener.stopService) if self.listener else defer.succeed(None)
        return stopping.addBoth(lambda _: self._drain()).addBoth(self._after_drain)

    def _drain(self) -> defer.Deferred[None]:
        if self.before_drain is not None:
            self.before_drain()  # requests still queued for a node slot are answered 503 now
        busy, connections = self._tracker.busy(), len(self._tracker.protocols)
        started = self._clock.seconds()
        log.info("draining {busy} request(s) on {connections} connection(s), up to {grace:g} s",
                 busy=busy, connections=connections, grace=self._grace)
        closed = self._tracker.drain()
        timer = self._clock.callLater(self._grace, self._abort, closed)
        result: defer.Deferred[None] = defer.Deferred()

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
                log.info("drained in {seconds:.1f} s", seconds=self._clock.seconds() - started)
            result.callback(None)

        closed.addBoth(finished)
        return result

    def _abort(self, closed: defer.Deferred[None]) -> None:
        count = self._tracker.abort_all()
        log.warn("aborted {count} connection(s) after the {grace:g} s grace", count=count, grace=self._grace)
        closed.addTimeout(ABORT_SETTLE, self._clock)

    def _after_drain(self, _: object) -> defer.Deferred[list[object]]:
        if self._save is not None:
            self._save()
        others = [service for service in reversed(list(self)) if service is not self.listener]
        return defer.gatherResults([defer.maybeDeferred(service.stopService) for service in others],
                                   consumeErrors=True)
