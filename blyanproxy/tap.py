"""``twistd blyan-proxy``: the command-line options and the composition root.

``makeService`` builds every object from the ``Settings`` and returns one
``MultiService``; nothing below it reads the environment or imports the reactor.
"""

from __future__ import annotations

import os
import secrets
from typing import Optional

import attrs
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.python import usage

from .admin import AdminAPI
from .adminauth import FailureThrottle, load_or_create_token
from .balancer import Balancer
from .client import UpstreamPool
from .config import (
    LISTEN_OPTION,
    SETTINGS,
    ConfigError,
    NodeSpec,
    Settings,
    settings_from,
)
from .fleet import FleetKeeper
from .health import HealthMonitor, probe_client
from .healthstate import HealthRules
from .logs import logger, set_log_format, set_log_level
from .metrics import MetricsResource, ProxyMetrics
from .nodes import Node, NodeRegistry, new_node_id
from .proxy import ProxyResource
from .public import HealthView, StatusView
from .server import ProxySite, RootResource
from .state import JsonFileStore, StateError
from .traffic import TrafficRecorder
from .upstream import NodeEndpoints, NodeTLSPolicy, load_trust_root

log = logger("tap")


def _option_help(setting) -> str:
    env = f"env {setting.env}, " if setting.env else ""
    return f"{setting.meaning} [{env}default {setting.default}]"


class Options(usage.Options):
    """Options of ``twistd blyan-proxy``; each has an environment variable (see README)."""

    synopsis = "[options]"
    longdesc = (
        "Streaming reverse proxy and load balancer for GPU inference nodes. Settings come from "
        "built-in defaults, then environment variables, then these options. Nodes come from "
        "NODE_<n>=name|url[|weight=N|tags=a,b|tls_verify=false] variables and --node."
    )
    optParameters = [[LISTEN_OPTION.option, "p", None, _option_help(LISTEN_OPTION)]] + [
        [setting.option, None, None, _option_help(setting)]
        for setting in SETTINGS
        if setting.option is not None
    ]

    def __init__(self) -> None:
        super().__init__()
        self.node_options: list = []
        self.settings: Settings = Settings()

    def opt_node(self, value: str) -> None:
        """Add a node: name|url[|weight=N|tags=a,b|tls_verify=false] (repeatable)."""
        self.node_options.append(value)

    def postOptions(self) -> None:
        try:
            self.settings = settings_from(os.environ, self, self.node_options)
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        try:
            serverFromString(None, self.settings.listen)  # parse only: twistd picks the reactor later
        except (ValueError, KeyError, TypeError) as exc:
            raise usage.UsageError(f"--port: {self.settings.listen!r} is not usable ({exc})") from None
        if self.settings.tls_ca_file:
            try:
                load_trust_root(self.settings.tls_ca_file)
            except ValueError as exc:
                raise usage.UsageError(f"TLS_CA_FILE: {exc}") from None


def node_from_spec(spec: NodeSpec, now: float) -> Node:
    """A registry ``Node`` for a node named in the environment or on the command line."""
    return Node(
        id=new_node_id(),
        name=spec.name,
        base_url=spec.base_url,
        tags=spec.tags,
        weight=spec.weight,
        tls_verify=spec.tls_verify,
        added_at=now,
        declared_by=spec.source,
    )


class UpstreamPoolService(Service):
    """Closes idle upstream connections past their time, and every one when the proxy stops."""

    def __init__(self, pool: UpstreamPool, clock, idle_timeout: float) -> None:
        self._pool = pool
        self._sweeper = LoopingCall(pool.sweep)
        self._sweeper.clock = clock
        self._interval = max(idle_timeout / 2, 0.05)

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self._interval, now=False)

    def stopService(self):
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        return self._pool.close()


class DemoNodesService(Service):
    """Starts simulated nodes on free loopback ports and registers them (``--demo N``)."""

    def __init__(self, reactor, registry: NodeRegistry, count: int) -> None:
        self._reactor = reactor
        self._registry = registry
        self._count = count
        self._ports: list = []

    def startService(self) -> None:
        from .devnode import DevNodeConfig, listen_devnode

        super().startService()
        for index in range(self._count):
            config = DevNodeConfig(name=f"demo-{index}")
            _, port = listen_devnode(self._reactor, config)
            self._ports.append(port)
            url = f"http://127.0.0.1:{port.getHost().port}"
            self._registry.add(
                Node(id=new_node_id(), name=config.name, base_url=url, added_at=self._reactor.seconds())
            )
            log.info("demo node {name} listening on {url}", name=config.name, url=url)

    def stopService(self):
        super().stopService()
        from twisted.internet.defer import gatherResults

        ports, self._ports = self._ports, []
        return gatherResults([port.stopListening() for port in ports])


@attrs.frozen
class ProxyParts:
    """Everything one proxy process is made of, wired together but not yet started."""

    site: ProxySite
    registry: NodeRegistry
    balancer: Balancer
    pool: UpstreamPool
    health: HealthMonitor
    keeper: Optional[FleetKeeper]
    metrics: ProxyMetrics


def build_proxy(settings: Settings, reactor, persist: bool = True) -> ProxyParts:
    """Build the proxy's parts for ``settings``.

    With ``persist`` (and not in demo mode) the fleet is restored from
    ``STATE_FILE`` and saved on every change; ``StateError`` if the file is
    unusable. Otherwise the declared nodes are all there is.
    """
    registry = NodeRegistry()
    declared = [node_from_spec(spec, reactor.seconds()) for spec in settings.nodes]
    trust_root = load_trust_root(settings.tls_ca_file) if settings.tls_ca_file else None

    def verify_for(host: bytes, port: int) -> bool:
        for node in registry.nodes():
            if node.url.host.encode("ascii") == host and node.url.port == port:
                return node.tls_verify
        return True

    endpoints = NodeEndpoints(reactor, NodeTLSPolicy(verify_for, trust_root), settings.connect_timeout)
    pool = UpstreamPool(reactor, endpoints, settings.pool_max_idle, settings.pool_idle_timeout)
    rules = HealthRules(
        rise=settings.health_rise,
        fall=settings.health_fall,
        eject_after=settings.eject_after,
        cooldown=settings.eject_cooldown,
        cooldown_cap=settings.eject_cooldown_max,
    )
    balancer = Balancer(registry, reactor, settings.selection_policy, rules, settings.affinity_load_factor)
    keeper = None
    if persist and not settings.demo:
        keeper = FleetKeeper(registry, balancer, JsonFileStore(settings.state_file, reactor))
        keeper.restore(declared)
    else:
        for node in declared:
            registry.add(node)
    health = HealthMonitor(
        registry, probe_client(reactor, endpoints), reactor, settings.health_interval, settings.health_timeout,
        settings.health_paths, settings.health_statuses, rules,
    )
    metrics = ProxyMetrics(registry, reactor)
    health.on_probe = metrics.probe
    recorder = TrafficRecorder(metrics, settings.access_log)
    forwarder = ProxyResource(balancer, pool, endpoints, reactor, settings, recorder)
    if persist:
        token = load_or_create_token(settings.admin_token, settings.admin_token_file, settings.state_file)
    else:
        token = settings.admin_token or secrets.token_urlsafe(32)
    admin = AdminAPI(registry, balancer, keeper, health, forwarder.counters, token, reactor,
                     FailureThrottle(reactor))
    root = RootResource(
        forwarder,
        prefixes={b"_admin": admin.resource()},
        exact={
            b"health": HealthView(registry, reactor),
            b"_status": StatusView(registry, balancer, forwarder.counters, reactor),
            **({b"metrics": MetricsResource(metrics, settings.metrics_token)} if settings.enable_metrics else {}),
        },
        recorder=recorder,
        clock=reactor,
    )
    site = ProxySite(root, settings.max_body_bytes, reactor=reactor, header_timeout=settings.header_timeout)
    return ProxyParts(
        site=site, registry=registry, balancer=balancer, pool=pool, health=health, keeper=keeper,
        metrics=metrics,
    )


def make_proxy_service(settings: Settings, reactor) -> MultiService:
    """Every service of one proxy process, as children of one ``MultiService``."""
    set_log_level(settings.log_level)
    set_log_format(settings.log_format)
    try:
        parts = build_proxy(settings, reactor)
    except (StateError, ValueError, OSError) as problem:
        raise SystemExit(f"blyan-proxy: {problem}") from None
    if settings.demo:
        log.info("demo mode: the fleet is not saved to {path}", path=settings.state_file)
    top = MultiService()
    UpstreamPoolService(parts.pool, reactor, settings.pool_idle_timeout).setServiceParent(top)
    if settings.demo:
        DemoNodesService(reactor, parts.registry, settings.demo).setServiceParent(top)
    parts.health.setServiceParent(top)
    strports.service(settings.listen, parts.site, reactor=reactor).setServiceParent(top)
    log.info(
        "blyan-proxy on {listen}: {count} node(s), policy {policy}",
        listen=settings.listen, count=len(settings.nodes) + settings.demo, policy=settings.selection_policy,
    )
    return top


def makeService(options: Options) -> MultiService:
    """twistd's entry point."""
    from twisted.internet import reactor

    return make_proxy_service(options.settings, reactor)
