"""The simulated node itself: its configuration, statistics and listening port (see the package)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from blyanproxy.devnode.config import DevNodeConfig
from blyanproxy.devnode.engines import Load
from blyanproxy.devnode.gpu import Gpu
from blyanproxy.devnode.http import DevNodeResource
from blyanproxy.devnode.site import DevNodeSite, header_lines

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
    from twisted.web.resource import IResource
    from twisted.web.server import Request, Site

    from blyanproxy.devnode.site import TrackedConnection


log = Logger()


def _text(data: bytes) -> str:
    """Bytes as a str, one character per byte (latin-1), so nothing is lost or re-encoded."""
    return data.decode("latin-1")


@attrs.frozen
class RequestRecord:
    """One request as received: method, raw target (percent-encoding kept), header lines, body."""

    method: bytes
    uri: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def as_json(self) -> dict:
        """The record with bytes as latin-1 strings, as ``/_devnode/echo`` and ``/_devnode/stats`` show it."""
        return {
            "method": _text(self.method),
            "uri": _text(self.uri),
            "headers": [[_text(name), _text(value)] for name, value in self.headers],
            "body": _text(self.body),
            "body_length": len(self.body),
        }


@attrs.define
class DevNodeStats:
    """What one node has served so far; mutable counters, read by tests and ``/_devnode/stats``.

    Streams end completed, dropped (``close_after``) or aborted (the client went away first;
    ``aborted_at`` holds the clock's time of each). ``bytes_sent`` counts body bytes handed to
    twisted.web by streams and ``/_devnode/bytes``. ``last_request`` is the latest request outside
    ``/_devnode/``.
    """

    requests: int = 0
    by_path: dict[str, int] = attrs.Factory(dict)
    open_connections: int = 0
    connections_made: int = 0
    connections_lost: int = 0
    open_streams: int = 0
    most_open_streams: int = 0  # the most open at once so far
    streams_started: int = 0
    streams_completed: int = 0
    streams_dropped: int = 0
    streams_aborted: int = 0
    aborted_at: list[float] = attrs.Factory(list)
    hanging: int = 0
    bytes_sent: int = 0
    websocket_messages: int = 0
    last_request: RequestRecord | None = None

    def as_json(self) -> dict:
        """A JSON-ready copy."""
        data = attrs.asdict(self, recurse=False)
        data["by_path"] = dict(self.by_path)
        data["aborted_at"] = list(self.aborted_at)
        data["last_request"] = self.last_request.as_json() if self.last_request else None
        return data


class DevNode:
    """State of one simulated node: its config (replaceable at runtime) and its stats.

    The clock paces tokens and delays; pass a ``task.Clock`` to drive a node in unit tests.
    """

    def __init__(self, config: DevNodeConfig, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.stats = DevNodeStats()
        self.gpu = Gpu()
        self.started = clock.seconds()
        self._connections: set[TrackedConnection] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def configure(self, **changes: object) -> DevNodeConfig:
        """Replace the config by a copy with ``changes``; TypeError/ValueError if one is invalid
        (the config is then unchanged). Requests already running keep the config they started with."""
        unknown = sorted(set(changes) - set(attrs.fields_dict(DevNodeConfig)))
        if unknown:
            raise TypeError(f"unknown setting {', '.join(unknown)}")
        fields: dict[str, Any] = changes  # any value: the config's validators check each
        self.config = attrs.evolve(self.config, **fields)
        log.info("devnode {name} reconfigured: {changes}", name=self.config.name, changes=changes)
        return self.config

    def loading(self) -> bool:
        """Whether the node is still loading its model (``loading_ms`` after it started)."""
        return self.clock.seconds() - self.started < self.config.loading_ms / 1000.0

    def load(self) -> Load:
        """What the node is doing now, as its engine's metrics show it."""
        return Load(running=self.gpu.running, waiting=self.gpu.waiting, loading=self.loading(),
                    capacity=self.config.max_num_seqs)

    def resource(self) -> IResource:
        """A twisted.web resource serving this node (mount it anywhere, or wrap it in StubTreq)."""
        return DevNodeResource(self)

    def site(self) -> Site:
        """A Site serving this node: no access log, raw header order kept, connections tracked."""
        return DevNodeSite(self)

    def note_request(self, request: Request) -> RequestRecord:
        """Count an arriving request in the stats and return its record."""
        assert request.content is not None  # twisted.web reads the body before rendering
        record = RequestRecord(
            request.method, request.uri, tuple(header_lines(request)), request.content.read()
        )
        path = _text(request.path)
        self.stats.requests += 1
        self.stats.by_path[path] = self.stats.by_path.get(path, 0) + 1
        if not path.startswith("/_devnode/"):
            self.stats.last_request = record
        return record

    def connection_made(self, connection: TrackedConnection) -> None:
        """A client connected to one of this node's Sites."""
        self._connections.add(connection)
        self.stats.open_connections += 1
        self.stats.connections_made += 1

    def connection_lost(self, connection: TrackedConnection) -> None:
        """A connection to this node closed, for whatever reason."""
        self._connections.discard(connection)
        self.stats.open_connections -= 1
        self.stats.connections_lost += 1
        if not self._connections:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def disconnect_all(self) -> Deferred[None]:
        """Abort every open connection (streams, hung requests, WebSockets, idle keep-alives).

        Fires once all are closed, by which time their timers are cancelled. Stop listening first,
        or new connections keep it waiting.
        """
        if not self._connections:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._idle_waiters.append(done)
        for connection in list(self._connections):
            connection.abort()
        return done


def listen_devnode(
    reactor: IReactorTCP, config: DevNodeConfig, interface: str = "127.0.0.1", port: int = 0
) -> tuple[DevNode, IListeningPort]:
    """Start a node listening on TCP ``interface:port`` (0: any free port); its clock is ``reactor``
    (an ``IReactorTime`` too).

    To stop it: ``listening.stopListening()``, then ``node.disconnect_all()``.
    """
    node = DevNode(config, cast("IReactorTime", reactor))
    # Twisted 26.10 types listenTCP's factory as ServerFactory[_ProtoWithFactory], which no Site
    # (a ServerFactory[HTTPChannel]) matches: a gap in Twisted's types, not in this call.
    return node, reactor.listenTCP(port, node.site(), interface=interface)  # type: ignore[arg-type]
