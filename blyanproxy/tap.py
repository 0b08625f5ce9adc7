"""``twistd blyan-proxy``: the composition root (the command line is ``options.Options``).

``makeService`` builds every object from the ``Settings`` and returns one
``MultiService``; nothing below it reads the environment or imports the reactor.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Mapping
from functools import partial

import attrs
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from blyanproxy.admin import (
    AdminAPI,
    FailureThrottle,
    HealthView,
    LivenessView,
    StatusView,
    WorkloadsView,
    load_or_create_token,
    token_file_path,
)
from blyanproxy.config import (
    NodeSpec,
    Settings,
)
from blyanproxy.core import AttemptRules, HealthRules, Node, NodeRegistry, StateError, StateStore, new_node_id
from blyanproxy.demo import DemoNodesService, demo_node_name
from blyanproxy.discovery import CacheLimits, KeyedBalancer, NodeAddressing, WorkloadDirectory, workloads_client
from blyanproxy.fleet import Balancer, FleetKeeper, HealthMonitor, LoadMonitor, probe_client
from blyanproxy.forward import (
    ForwardContext,
    ForwardRules,
    ProxyResource,
    RequestCounters,
    TrafficRecorder,
    write_access_line,
)
from blyanproxy.logs import logger, set_log_level
from blyanproxy.metrics import MetricsResource, ProxyMetrics
from blyanproxy.options import Options
from blyanproxy.otelenv import request_tracer
from blyanproxy.serve import (
    AdmissionSettings,
    ConnectionTracker,
    Drainer,
    Listener,
    ParentWatch,
    ProcessSignals,
    ProxySite,
    Reloader,
    RootResource,
    WorkerRole,
    WorkerSupervisor,
    build_admission,
    load_settings,
    tune_garbage_collector,
    with_backlog,
    worker_endpoint,
    worker_role,
)
from blyanproxy.startup import StartupFacts, log_summary, package_version
from blyanproxy.store import EtcdAccess, EtcdStore, JsonFileStore, MemoryStore
from blyanproxy.upstream import NodeEndpoints, NodeTLSPolicy, UpstreamPool, UpstreamPoolService, load_trust_root

log = logger("tap")


def node_from_spec(spec: NodeSpec, now: float) -> Node:
    """A registry ``Node`` for a node named in the environment or on the command line."""
    return Node(
        id=new_node_id(),
        name=spec.name,
        base_url=spec.base_url,
        tags=spec.tags,
        weight=spec.weight,
        tls_verify=spec.tls_verify,
        engine=spec.engine,
        models=spec.models,
        max_inflight=spec.max_inflight,
        added_at=now,
        declared_by=spec.source,
    )


@attrs.frozen
class ProxyParts:
    """Everything one proxy process is made of, wired together but not yet started."""

    site: ProxySite
    registry: NodeRegistry
    balancer: Balancer
    pool: UpstreamPool
    health: HealthMonitor
    load: LoadMonitor
    keeper: FleetKeeper
    metrics: ProxyMetrics
    store: StateStore
    recorder: TrafficRecorder
    admission: AdmissionSettings
    directory: WorkloadDirectory | None = None
    store_service: EtcdStore | None = None  # started with the proxy when the fleet is in etcd
    store_note: str = "memory only (nothing is saved)"  # where the fleet is kept, for the start-up summary
    token_note: str = "generated for this process only"  # where the admin token came from, likewise


def build_proxy(settings: Settings, reactor, persist: bool = True, worker: int | None = None,
                environ: Mapping[str, str] | None = None) -> ProxyParts:
    """Build the proxy's parts for ``settings``.

    With ``persist`` (and not in demo mode) the fleet is kept in the state
    store: restored from ``STATE_FILE`` now (``StateError`` if the file is
    unusable), or from etcd once ``store_service`` runs (until then the
    declared nodes serve). Otherwise changes live in memory. ``worker`` is the
    number of a worker process (``--workers``), shown in its metrics.
    ``environ`` (the process's environment by default) holds the ``OTEL_*``
    variables of tracing (``request_tracer``).
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
        store_note = "memory only (demo mode: nothing is saved)" if settings.demo else "memory only (nothing is saved)"
    elif settings.state_store is None:
        store = JsonFileStore(settings.state_file, reactor)
        store_note = f"state file {settings.state_file} ({_how_found(store)})"
    else:
        store = store_service = EtcdStore(
            reactor, settings.state_store, settings.etcd_timeout, declared,
            identity=f"{socket.gethostname()}:{os.getpid()}",
            access=EtcdAccess(settings.etcd_user, settings.etcd_password_file,
                              load_trust_root(settings.etcd_ca_file) if settings.etcd_ca_file else None),
        )
        store_note = (f"etcd at {settings.state_store.base_url}, keys under {settings.state_store.prefix.decode()} "
                      "(the declared nodes serve until it answers)")
    keeper = FleetKeeper(registry, balancer, store)
    try:
        keeper.restore(declared)
    except OSError as problem:
        raise StateError(f"STATE_FILE: {settings.state_file} cannot be saved: {_why(problem)}") from None
    health = HealthMonitor(
        registry, probe_client(reactor, endpoints), reactor, settings.health_interval, settings.health_timeout,
        settings.health_paths, settings.health_statuses, rules,
    )
    balancer.load_interval = settings.load_interval
    load = LoadMonitor(registry, probe_client(reactor, endpoints), reactor, settings.load_interval,
                       min(settings.health_timeout, settings.load_interval))
    metrics = ProxyMetrics(registry, reactor, worker, os.getpid())
    health.on_probe = metrics.probe
    counters = RequestCounters()
    recorder = TrafficRecorder(reactor, settings.trust_forwarded, metrics)
    if settings.access_log:
        recorder.subscribe(write_access_line)
    recorder.subscribe(metrics.request_finished)
    recorder.subscribe(counters.count)
    tracer = request_tracer(os.environ if environ is None else environ, reactor)
    if tracer is not None:
        recorder.watch(tracer)
    directory = build_directory(settings, reactor, rules, trust_root, metrics) if settings.api_url else None
    pools = [balancer] + ([directory.balancer] if directory is not None else [])
    admission = build_admission(settings, reactor, pools, metrics)
    metrics.node_gauges.cap_of = balancer.cap_of
    metrics.watch_queue(admission.admission.queue.depth_by_band)
    recorder.subscribe(admission.admission.finished)
    context = ForwardContext(reactor, pool, endpoints, recorder, forward_rules(settings), admission.admission)
    forwarder = ProxyResource(context, balancer, directory)
    if persist:
        token, token_note = admin_token(settings)
    elif settings.admin_token:
        token, token_note = settings.admin_token, "ADMIN_TOKEN"
    else:
        token, token_note = secrets.token_urlsafe(32), "generated for this process only"
    admin = AdminAPI(registry, balancer, keeper, health, counters, token, reactor,
                     FailureThrottle(reactor, trust=settings.trust_forwarded), admission.admission)
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
    site = ProxySite(root, settings.max_body_bytes, reactor=reactor, header_timeout=settings.header_timeout,
                     body_timeout=settings.body_timeout, max_buffered_bytes=settings.max_buffered_bytes,
                     max_connections_per_client=settings.max_connections_per_client,
                     unlimited_peers=settings.trust_forwarded)
    return ProxyParts(
        site=site, registry=registry, balancer=balancer, pool=pool, health=health, load=load, keeper=keeper,
        metrics=metrics, store=store, recorder=recorder, directory=directory, store_service=store_service,
        store_note=store_note, token_note=token_note, admission=admission,
    )


def _how_found(store: JsonFileStore) -> str:
    """Whether restoring ``store`` loads its file, falls back to the backup, or creates it."""
    if os.path.exists(store.path):
        return "loaded"
    return f"restored from {store.backup}" if os.path.exists(store.backup) else "created"


def _why(problem: OSError) -> str:
    """An ``OSError``'s reason and the path it is about, without Python's ``[Errno n]``."""
    reason = problem.strerror or str(problem)
    return f"{reason} ({problem.filename})" if problem.filename else reason


def admin_token(settings: Settings) -> tuple[str, str]:
    """The admin token (``ADMIN_TOKEN``, or the token file, made if missing) and where it came from.

    ``ValueError`` naming the variable when the token file cannot be read or written."""
    if settings.admin_token:
        return settings.admin_token, "ADMIN_TOKEN"
    path = token_file_path(settings.admin_token_file, settings.state_file)
    variable = "ADMIN_TOKEN_FILE" if settings.admin_token_file else "STATE_FILE (the admin token file beside it)"
    existed = os.path.exists(path)
    try:
        token = load_or_create_token(None, settings.admin_token_file, settings.state_file)
    except OSError as problem:
        raise ValueError(f"{variable}: {path} cannot be {'read' if existed else 'made'}: {_why(problem)}") from None
    except ValueError as problem:
        raise ValueError(f"{variable}: {problem}") from None
    return token, f"file {path} ({'read' if existed else 'created, mode 0600'})"


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
    try:
        parts = build_proxy(settings, reactor, worker=role.index if role else None)
    except (StateError, ValueError, OSError) as problem:
        raise SystemExit(f"blyan-proxy: {problem}") from None
    connections = ConnectionTracker(parts.site)
    top = Drainer(connections, reactor, settings.drain_grace, parts.keeper.flush)
    top.before_drain = parts.admission.admission.queue.close
    UpstreamPoolService(parts.pool, reactor, settings.pool_idle_timeout).setServiceParent(top)
    if parts.store_service is not None:
        parts.store_service.setServiceParent(top)
    if settings.demo:
        DemoNodesService(reactor, parts.registry, settings.demo).setServiceParent(top)
    parts.health.setServiceParent(top)
    parts.load.setServiceParent(top)
    if parts.directory is not None:
        parts.directory.setServiceParent(top)
    if reload_settings is not None:
        reloader = Reloader(settings, reload_settings, parts.registry, parts.keeper,
                            lambda spec: node_from_spec(spec, reactor.seconds()), parts.admission.apply)
        ProcessSignals(reactor, reloader.reload).setServiceParent(top)
    summary = partial(log_summary, startup_facts(settings, parts, role))  # logged once the port is open
    if role is None:
        endpoint = serverFromString(reactor, with_backlog(settings.listen, settings.listen_backlog))
        top.add_listener(Listener(endpoint, connections, settings.listen, summary))
    else:
        top.add_listener(Listener(worker_endpoint(reactor, role), connections, "the supervisor's socket", summary))
        reactor.addReader(ParentWatch(reactor))
    return top


def startup_facts(settings: Settings, parts: ProxyParts, role: WorkerRole | None) -> StartupFacts:
    """What this process runs, after the fleet was restored (the start-up summary's facts)."""
    return StartupFacts(
        listen=settings.listen,
        process=f"worker {role.index}" if role else "one process",
        nodes=tuple(node.name for node in parts.registry.nodes())
        + tuple(demo_node_name(index) for index in range(settings.demo)),
        declared=len(settings.nodes),
        store=parts.store_note,
        token=parts.token_note,
        policy=parts.balancer.policy,
        settings_policy=settings.selection_policy,
        runtime_policy=parts.keeper.snapshot().policy,
        discovery=settings.api_url,
    )


def make_supervisor_service(settings: Settings, reactor, arguments: list) -> WorkerSupervisor:
    """The ``--workers N`` supervisor: workers run ``blyan-proxy`` (``twistd -n blyan-proxy``) with ``arguments``."""
    set_log_level(settings.log_level)
    try:  # the token file is written once here, not raced by the workers
        _, token_note = admin_token(settings)
    except ValueError as problem:
        raise SystemExit(f"blyan-proxy: {problem}") from None
    log.info("blyan-proxy {version} supervising {workers} workers on {listen}; admin token: {token}",
             version=package_version(), workers=settings.workers, listen=settings.listen, token=token_note)
    # The console script's way in, not twistd's: it finds the plugin in every install mode.
    argv = [sys.executable, "-c", "from blyanproxy.scripts import proxy; proxy()", *arguments]
    listen = with_backlog(settings.listen, settings.listen_backlog)
    return WorkerSupervisor(reactor, listen, settings.workers, argv, os.environ, settings.worker_stop_timeout)


def makeService(options: Options):
    """twistd's entry point: one proxy, a worker, or the supervisor of ``WORKERS`` workers."""
    from twisted.internet import reactor

    def reload_settings() -> Settings:
        return load_settings(os.environ, options, options.node_options)

    role = worker_role(os.environ)
    if role is None and options.settings.workers > 1:
        return make_supervisor_service(options.settings, reactor, options.worker_arguments())
    service = make_proxy_service(options.settings, reactor, reload_settings, role)
    reactor.callWhenRunning(tune_garbage_collector)  # start-up's objects are all made by then
    return service
