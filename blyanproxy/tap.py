"""``twistd blyan-proxy``: the command-line options and the composition root.

``makeService`` builds every object from the ``Settings`` and returns one
``MultiService``; nothing below it reads the environment or imports the reactor.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from typing import cast

import attrs
from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.python import usage

from blyanproxy.admin import (
    AdminAPI,
    FailureThrottle,
    HealthView,
    LivenessView,
    StatusView,
    WorkloadsView,
    load_or_create_token,
)
from blyanproxy.config import (
    LISTEN_OPTION,
    SETTINGS,
    ConfigError,
    NodeSpec,
    Settings,
)
from blyanproxy.core import AttemptRules, HealthRules, Node, NodeRegistry, StateError, StateStore, new_node_id
from blyanproxy.discovery import CacheLimits, KeyedBalancer, NodeAddressing, WorkloadDirectory, workloads_client
from blyanproxy.fleet import Balancer, FleetKeeper, HealthMonitor, probe_client
from blyanproxy.forward import (
    ForwardContext,
    ForwardRules,
    ProxyResource,
    RequestCounters,
    TrafficRecorder,
    write_access_line,
)
from blyanproxy.logs import logger, set_log_format, set_log_level
from blyanproxy.metrics import MetricsResource, ProxyMetrics
from blyanproxy.serve import (
    ConnectionTracker,
    Drainer,
    ParentWatch,
    ProcessSignals,
    ProxySite,
    Reloader,
    RootResource,
    WorkerRole,
    WorkerSupervisor,
    load_settings,
    worker_endpoint,
    worker_role,
)
from blyanproxy.store import EtcdAccess, EtcdStore, JsonFileStore, MemoryStore
from blyanproxy.upstream import NodeEndpoints, NodeTLSPolicy, UpstreamPool, load_trust_root

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

    def worker_arguments(self) -> list:
        """The ``blyan-proxy`` arguments a worker process gets: these options but ``--workers``."""
        names = [str(name) for name, *_ in self.optParameters]
        given = [f"--{name}={self[name]}" for name in names if name != "workers" and self[name] is not None]
        return given + [f"--node={value}" for value in self.node_options]

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(os.environ, self, self.node_options)
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        try:
            serverFromString(None, self.settings.listen)  # parse only: twistd picks the reactor later
        except (ValueError, KeyError, TypeError) as exc:
            raise usage.UsageError(f"--port: {self.settings.listen!r} is not usable ({exc})") from None
        for variable, ca_file in (("TLS_CA_FILE", self.settings.tls_ca_file),
                                  ("ETCD_CA_FILE", self.settings.etcd_ca_file)):
            try:
                if ca_file:
                    load_trust_root(ca_file)
            except ValueError as exc:
                raise usage.UsageError(f"{variable}: {exc}") from None


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
        from blyanproxy.devnode import DevNodeConfig, listen_devnode

        super().startService()
        for index in range(self._count):
            config = DevNodeConfig(name=f"demo-{index}")
            _, port = listen_devnode(self._reactor, config)
            self._ports.append(port)
            url = f"http://127.0.0.1:{cast(IPv4Address, port.getHost()).port}"
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
    keeper: FleetKeeper
    metrics: ProxyMetrics
    store: StateStore
    directory: WorkloadDirectory | None = None
    store_service: EtcdStore | None = None  # started with the proxy when the fleet is in etcd


def build_proxy(settings: Settings, reactor, persist: bool = True, worker: int | None = None) -> ProxyParts:
    """Build the proxy's parts for ``settings``.

    With ``persist`` (and not in demo mode) the fleet is kept in the state
    store: restored from ``STATE_FILE`` now (``StateError`` if the file is
    unusable), or from etcd once ``store_service`` runs (until then the
    declared nodes serve). Otherwise changes live in memory. ``worker`` is the
    number of a worker process (``--workers``), shown in its metrics.
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
    store_service = None
    store: StateStore
    if not persist or settings.demo:
        store = MemoryStore()
    elif settings.state_store is None:
        store = JsonFileStore(settings.state_file, reactor)
    else:
        store = store_service = EtcdStore(
            reactor, settings.state_store, settings.etcd_timeout, declared,
            identity=f"{socket.gethostname()}:{os.getpid()}",
            access=EtcdAccess(settings.etcd_user, settings.etcd_password_file,
                              load_trust_root(settings.etcd_ca_file) if settings.etcd_ca_file else None),
        )
    keeper = FleetKeeper(registry, balancer, store)
    keeper.restore(declared)
    health = HealthMonitor(
        registry, probe_client(reactor, endpoints), reactor, settings.health_interval, settings.health_timeout,
        settings.health_paths, settings.health_statuses, rules,
    )
    metrics = ProxyMetrics(registry, reactor, worker, os.getpid())
    health.on_probe = metrics.probe
    counters = RequestCounters()
    recorder = TrafficRecorder(reactor, settings.trust_forwarded, metrics)
    if settings.access_log:
        recorder.subscribe(write_access_line)
    recorder.subscribe(metrics.request_finished)
    recorder.subscribe(counters.count)
    directory = build_directory(settings, reactor, rules, trust_root, metrics) if settings.api_url else None
    context = ForwardContext(reactor, pool, endpoints, recorder, forward_rules(settings))
    forwarder = ProxyResource(context, balancer, directory)
    if persist:
        token = load_or_create_token(settings.admin_token, settings.admin_token_file, settings.state_file)
    else:
        token = settings.admin_token or secrets.token_urlsafe(32)
    admin = AdminAPI(registry, balancer, keeper, health, counters, token, reactor,
                     FailureThrottle(reactor, trust=settings.trust_forwarded))
    root = RootResource(
        forwarder,
        prefixes={b"_admin": admin.resource()},
        exact={
            b"health": HealthView(registry, reactor),
            b"_status": StatusView(registry, balancer, counters, reactor),
            **({b"metrics": MetricsResource(metrics, settings.metrics_token)} if settings.enable_metrics else {}),
            **({b"": LivenessView(reactor), b"workloads": WorkloadsView(directory, settings.trust_forwarded)}
               if directory is not None else {}),
        },
        recorder=recorder,
    )
    site = ProxySite(root, settings.max_body_bytes, reactor=reactor, header_timeout=settings.header_timeout)
    return ProxyParts(
        site=site, registry=registry, balancer=balancer, pool=pool, health=health, keeper=keeper,
        metrics=metrics, store=store, directory=directory, store_service=store_service,
    )


def forward_rules(settings: Settings) -> ForwardRules:
    """The few settings the data path reads."""
    return ForwardRules(
        attempts=AttemptRules(
            max_attempts=settings.max_attempts,
            retry_delay=settings.retry_delay,
            retry_on_status=settings.retry_on_status,
            health_interval=settings.health_interval,
        ),
        proxy_timeout=settings.proxy_timeout,
        idle_timeout=settings.idle_timeout,
        sse_keepalive=settings.sse_keepalive,
        trust_forwarded=settings.trust_forwarded,
        strip_origin=settings.strip_origin,
        affinity_key=settings.affinity_key,
        ws_heartbeat=settings.ws_heartbeat,
    )


def build_directory(settings: Settings, reactor, rules: HealthRules, trust_root, metrics) -> WorkloadDirectory:
    """The per-API-key workloads cache for ``API_URL``, with its API client and keyed balancer."""
    assert settings.api_url is not None  # called only with discovery on
    client = workloads_client(reactor, settings.api_url, settings.workloads_timeout, trust_root)
    limits = CacheLimits(
        refresh=settings.workloads_refresh,
        idle=settings.workloads_idle,
        negative_ttl=settings.workloads_negative_ttl,
        rejected_ttl=settings.workloads_rejected_ttl,
        stale_max=settings.workloads_stale_max,
    )
    return WorkloadDirectory(
        client, reactor, KeyedBalancer(reactor, settings.workloads_policy, rules, settings.affinity_load_factor),
        limits,
        NodeAddressing(settings.workloads_node_scheme, settings.workloads_node_port, settings.workloads_node_allow),
        settings.workloads_max_keys, settings.workloads_max_calls, metrics, settings.workloads_timeout,
        settings.workloads_lookups_per_client,
    )


def make_proxy_service(settings: Settings, reactor, reload_settings=None,
                       role: WorkerRole | None = None) -> MultiService:
    """Every service of one proxy process (a worker when ``role`` is given), under one ``Drainer``.

    ``reload_settings`` (a callable returning fresh ``Settings``) makes SIGHUP
    reload them; with it, SIGTERM and SIGHUP get the proxy's handlers.
    """
    set_log_level(settings.log_level)
    set_log_format(settings.log_format)
    try:
        parts = build_proxy(settings, reactor, worker=role.index if role else None)
    except (StateError, ValueError, OSError) as problem:
        raise SystemExit(f"blyan-proxy: {problem}") from None
    if settings.demo:
        log.info("demo mode: the fleet is not saved to {path}", path=settings.state_file)
    connections = ConnectionTracker(parts.site)
    top = Drainer(connections, reactor, settings.drain_grace, parts.keeper.flush)
    UpstreamPoolService(parts.pool, reactor, settings.pool_idle_timeout).setServiceParent(top)
    if parts.store_service is not None:
        parts.store_service.setServiceParent(top)
    if settings.demo:
        DemoNodesService(reactor, parts.registry, settings.demo).setServiceParent(top)
    parts.health.setServiceParent(top)
    if parts.directory is not None:
        parts.directory.setServiceParent(top)
    if reload_settings is not None:
        reloader = Reloader(settings, reload_settings, parts.registry, parts.keeper,
                            lambda spec: node_from_spec(spec, reactor.seconds()))
        ProcessSignals(reactor, reloader.reload).setServiceParent(top)
    if role is None:
        top.add_listener(strports.service(settings.listen, connections, reactor=reactor))
    else:
        top.add_listener(StreamServerEndpointService(worker_endpoint(reactor, role), connections))
        reactor.addReader(ParentWatch(reactor))
    log.info(
        "blyan-proxy on {listen}{worker}: {count} node(s), policy {policy}",
        listen=settings.listen, worker=f" (worker {role.index})" if role else "",
        count=len(settings.nodes) + settings.demo, policy=settings.selection_policy,
    )
    return top


def make_supervisor_service(settings: Settings, reactor, arguments: list) -> WorkerSupervisor:
    """The ``--workers N`` supervisor: workers run ``twistd -n blyan-proxy`` with ``arguments``."""
    set_log_level(settings.log_level)
    set_log_format(settings.log_format)
    try:  # the token file is written once here, not raced by the workers
        load_or_create_token(settings.admin_token, settings.admin_token_file, settings.state_file)
    except (ValueError, OSError) as problem:
        raise SystemExit(f"blyan-proxy: {problem}") from None
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "blyan-proxy", *arguments]
    return WorkerSupervisor(reactor, settings.listen, settings.workers, argv, os.environ,
                            settings.worker_stop_timeout)


def makeService(options: Options):
    """twistd's entry point: one proxy, a worker, or the supervisor of ``WORKERS`` workers."""
    from twisted.internet import reactor

    def reload_settings() -> Settings:
        return load_settings(os.environ, options, options.node_options)

    role = worker_role(os.environ)
    if role is None and options.settings.workers > 1:
        return make_supervisor_service(options.settings, reactor, options.worker_arguments())
    return make_proxy_service(options.settings, reactor, reload_settings, role)
