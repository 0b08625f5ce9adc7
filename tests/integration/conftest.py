"""Fixtures for tests that start real servers on 127.0.0.1."""

from __future__ import annotations

import attrs
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime

from blyanproxy.devnode import DevNode, DevNodeConfig, listen_devnode

from .capture import capture_node  # noqa: F401  (a fixture: nodes that record their raw bytes)
from .rawnode import raw_node  # noqa: F401  (a fixture: nodes that answer bytes a test chooses)

STOP_TIMEOUT = 5.0
"""Seconds the devnode_factory teardown waits for its nodes to stop."""


@attrs.frozen
class RunningDevNode:
    """A DevNode listening on 127.0.0.1, as devnode_factory starts it."""

    node: DevNode
    listening: IListeningPort
    port: int = attrs.field(init=False)  # kept, so url still works after stop()

    @port.default
    def _listening_port(self) -> int:
        return self.listening.getHost().port

    @property
    def url(self) -> str:
        """Its base URL, e.g. ``http://127.0.0.1:12345``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> Deferred[None]:
        """Stop listening, then abort the node's open connections; fires once all are closed.

        Safe to call more than once."""
        stopped = maybeDeferred(self.listening.stopListening)
        stopped.addCallback(lambda _: self.node.disconnect_all())
        return stopped


def devnode_timers(reactor: IReactorTime) -> list:
    """The reactor's pending calls that belong to devnode code (token, delay timers)."""
    return [
        call
        for call in reactor.getDelayedCalls()
        if getattr(call.func, "__module__", "").startswith("blyanproxy.devnode")
    ]


@pytest_twisted.async_yield_fixture()
async def devnode_factory(reactor):
    """Start DevNodes on 127.0.0.1:0: ``devnode_factory(**config_overrides) -> RunningDevNode``.

    The overrides are DevNodeConfig fields (``devnode_factory(tokens_per_second=5, hang=True)``).
    Teardown stops every node started (ports and open connections) within STOP_TIMEOUT seconds,
    then checks that no devnode timer is left on the reactor.
    """
    started: list[RunningDevNode] = []

    def start(**config_overrides: object) -> RunningDevNode:
        node, listening = listen_devnode(reactor, DevNodeConfig(**config_overrides))
        started.append(RunningDevNode(node, listening))
        return started[-1]

    yield start
    stopping = gatherResults([running.stop() for running in started], consumeErrors=True)
    await stopping.addTimeout(STOP_TIMEOUT, reactor)
    assert devnode_timers(reactor) == []


from .fakeworkloads import workloads_api  # noqa: E402,F401  (a fixture for discovery tests)
