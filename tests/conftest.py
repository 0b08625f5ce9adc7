"""Fixtures shared by every test module."""

import attrs
import pytest
import pytest_twisted
from hypothesis import settings as hypothesis_settings
from twisted.internet.defer import ensureDeferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory

from blyanproxy.config import NodeSpec, Settings
from blyanproxy.tap import build_proxy

# Property tests check behaviour, never speed: no per-example deadline (a loaded CI host
# would otherwise fail them as "flaky").
hypothesis_settings.register_profile("blyanproxy", deadline=None)
hypothesis_settings.load_profile("blyanproxy")


@pytest.fixture
def access_lines():
    """The proxy's access log lines written during the test."""
    lines = []

    def observe(event):
        if event.get("log_namespace") == "blyanproxy.access":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def debug_log():
    """``debug_log(namespace)``: the list of that namespace's DEBUG lines, rendered, while LOG_LEVEL is DEBUG."""
    from blyanproxy.logs import set_log_level

    observers = []

    def lines_of(namespace):
        lines = []

        def observe(event):
            if event.get("log_namespace") == namespace and event["log_level"].name == "debug":
                lines.append(formatEvent(event))

        observers.append(observe)
        globalLogPublisher.addObserver(observe)
        return lines

    set_log_level("DEBUG")
    yield lines_of
    for observe in observers:
        globalLogPublisher.removeObserver(observe)
    set_log_level("INFO")


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs for the whole session."""
    from twisted.internet import reactor as global_reactor

    return global_reactor


class RunningProxy:
    """A proxy built from ``Settings`` and listening on 127.0.0.1 (see ``proxy_factory``)."""

    def __init__(self, settings, parts, port, connections):
        self.settings = settings
        self.parts = parts
        self.site = parts.site
        self.registry = parts.registry
        self.pool = parts.pool
        self.port = port
        self.connections = connections
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.stopped = False

    async def stop(self):
        """Stop listening, cut open client connections and close the upstream pool (once)."""
        if self.stopped:
            return
        self.stopped = True
        await self.port.stopListening()
        if self.parts.store_service is not None and self.parts.store_service.running:
            await self.parts.store_service.stopService()
        if self.parts.health.running:
            await self.parts.health.stopService()
        if self.parts.directory is not None and self.parts.directory.running:
            await self.parts.directory.stopService()
        for protocol in list(self.connections.protocols):
            protocol.transport.abortConnection()
        await self.pool.close()


@pytest.fixture
def proxy_factory(reactor):
    """Start proxies: ``await proxy_factory([node_url, ...], health_checks=False, persist=False,
    **settings)``.

    Active health checks run only when asked for; with ``persist`` the fleet is kept in
    ``state_file`` (pass one under ``tmp_path``) or, with ``state_store``, in etcd (the
    store's service is started). Everything is stopped at teardown.
    """
    running = []

    async def start(node_urls=(), health_checks=False, persist=False, **overrides):
        nodes = tuple(
            NodeSpec(name=f"node{i}", base_url=url, source="test") for i, url in enumerate(node_urls)
        )
        settings = attrs.evolve(Settings(), nodes=nodes, **overrides)
        parts = build_proxy(settings, reactor, persist=persist)
        connections = WrappingFactory(parts.site)
        port = reactor.listenTCP(0, connections, interface="127.0.0.1")
        proxy = RunningProxy(settings, parts, port, connections)
        if health_checks:
            parts.health.startService()
        if parts.directory is not None:
            parts.directory.startService()
        if parts.store_service is not None:
            parts.store_service.startService()
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        pytest_twisted.blockon(ensureDeferred(proxy.stop()))
