"""Prometheus metrics of one proxy process, and the ``/metrics`` resource that renders them.

Labels are bounded: node names, fixed words (status class, how a request
ended, a failure reason from a fixed set, stream kind). Never API keys,
paths or client addresses. Node gauges (in flight, up, usable, ejected,
draining, loading, engine, models) are read from the registry at scrape time, so
``/_admin/status`` and ``/metrics`` show the same numbers. Engine names are a
fixed set; model names come from the node or its declaration, at most
``MAX_MODEL_LABELS`` per node.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from blyanproxy.admin import presented_token, token_matches
from blyanproxy.core import BANDS, LOADING, UP, Node, ProxyError, engine_of, served_models, usable, write_error

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.server import Request

    from blyanproxy.core import NodeRegistry

#: Time to first byte and whole-request buckets, from milliseconds to the length of a long generation.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: The most models per node that ``blyan_node_model_info`` shows (the label set stays bounded).
MAX_MODEL_LABELS = 16
#: The most models ``blyan_tokens`` names; further ones count as ``other`` (the label set stays bounded).
MAX_TOKEN_MODELS = 32
#: Seconds a request waited in the queue for a node slot.
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PROBE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class FinishedRequest(typing.Protocol):
    """What ``ProxyMetrics.request_finished`` reads of a finished request (forward's ``AccessRecord``)."""

    @property
    def node(self) -> str | None: ...

    @property
    def status(self) -> int: ...

    @property
    def ended(self) -> str: ...

    @property
    def ttfb(self) -> float | None: ...

    @property
    def duration(self) -> float: ...

    @property
    def bytes_out(self) -> int: ...

    @property
    def model(self) -> str | None: ...

    @property
    def tokens_in(self) -> int | None: ...

    @property
    def tokens_out(self) -> int | None: ...


def _band_depth(depth_by_band: Callable[[], dict[str, int]], band: str) -> float:
    return depth_by_band()[band]


class _NodeGauges:
    """A collector reading the live node figures at scrape time."""

    def __init__(self, registry: NodeRegistry, clock: IReactorTime) -> None:
        self._registry = registry
        self._clock = clock
        self.cap_of: Callable[[Node], int | None] = lambda node: node.max_inflight

    def collect(self) -> list[GaugeMetricFamily]:
        """The node gauges as they are now."""
        now = self._clock.seconds()
        families = {
            "in_flight": GaugeMetricFamily("blyan_node_in_flight", "Requests in flight on a node (slots in use)",
                                           labels=["node"]),
            "cap": GaugeMetricFamily("blyan_node_max_inflight", "A capped node's slots (NODE_MAX_INFLIGHT or its own)",
                                     labels=["node"]),
            "up": GaugeMetricFamily("blyan_node_up", "1 when the node's health checks pass", labels=["node"]),
            "usable": GaugeMetricFamily("blyan_node_usable", "1 when the node can take new requests",
                                        labels=["node"]),
            "ejected": GaugeMetricFamily("blyan_node_ejected", "1 while the node is ejected by failed traffic",
                                         labels=["node"]),
            "draining": GaugeMetricFamily("blyan_node_draining", "1 while the node is draining", labels=["node"]),
            "loading": GaugeMetricFamily("blyan_node_loading", "1 while the node says it is loading its model",
                                         labels=["node"]),
            "engine": GaugeMetricFamily("blyan_node_engine_info", "The node's engine (declared or detected)",
                                        labels=["node", "engine"]),
            "model": GaugeMetricFamily("blyan_node_model_info",
                                       f"1 for each model the node serves (at most {MAX_MODEL_LABELS} a node)",
                                       labels=["node", "model"]),
        }
        for node in self._registry.nodes():
            stats = self._registry.stats(node.id)
            health = stats.health
            families["in_flight"].add_metric([node.name], stats.in_flight)
            cap = self.cap_of(node)
            if cap is not None:
                families["cap"].add_metric([node.name], cap)
            families["up"].add_metric([node.name], 1 if health.state == UP else 0)
            families["usable"].add_metric([node.name], 1 if usable(health, now) and not node.draining else 0)
            families["ejected"].add_metric([node.name], 1 if health.probe_needed else 0)
            families["draining"].add_metric([node.name], 1 if node.draining else 0)
            families["loading"].add_metric([node.name], 1 if health.state == LOADING else 0)
            families["engine"].add_metric([node.name, engine_of(node.engine, stats.engine) or "unknown"], 1)
            for model in (served_models(node.models, stats.models) or ())[:MAX_MODEL_LABELS]:
                families["model"].add_metric([node.name, model], 1)
        return list(families.values())


class _LoadGauges:
    """A collector of the engines' own load figures as last read, and their age."""

    def __init__(self, registry: NodeRegistry, clock: IReactorTime) -> None:
        self._registry = registry
        self._clock = clock

    def collect(self) -> list[GaugeMetricFamily]:
        """One sample per node and figure its engine reported."""
        now = self._clock.seconds()
        families = {
            "waiting": GaugeMetricFamily("blyan_node_engine_waiting", "Requests queued, as the node's engine says",
                                         labels=["node"]),
            "running": GaugeMetricFamily("blyan_node_engine_running", "Requests running, as the node's engine says",
                                         labels=["node"]),
            "kv_use": GaugeMetricFamily("blyan_node_engine_kv_cache_usage",
                                        "KV-cache use from 0 to 1, as the node's engine says", labels=["node"]),
            "age": GaugeMetricFamily("blyan_node_load_age_seconds", "Seconds since the node's load was read",
                                     labels=["node"]),
        }
        for node in self._registry.nodes():
            load = self._registry.stats(node.id).load
            if load is None:
                continue
            for name, value in (("waiting", load.waiting), ("running", load.running), ("kv_use", load.kv_use)):
                if value is not None:
                    families[name].add_metric([node.name], value)
            families["age"].add_metric([node.name], max(0.0, now - load.at))
        return list(families.values())


class _WorkerLabel:
    """Adds a ``worker`` label to every sample of a registry (one scrape shows one worker)."""

    def __init__(self, registry: CollectorRegistry, worker: str) -> None:
        self._registry = registry
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        """The registry's families, each sample labelled with the worker."""
        for family in self._registry.collect():
            family.samples = [sample._replace(labels={**sample.labels, "worker": self._worker})
                              for sample in family.samples]
            yield family


class ProxyMetrics:
    """Every metric family of the proxy, in its own ``CollectorRegistry``.

    In a worker process (``worker`` = its number) every sample carries a
    ``worker`` label and ``blyan_worker_info`` names the process's pid.
    """

    def __init__(
        self, node_registry: NodeRegistry, clock: IReactorTime, worker: int | None = None, pid: int = 0
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._scraped: Collector = r if worker is None else _WorkerLabel(r, str(worker))
        if worker is not None:
            Gauge("blyan_worker_info", "This worker process (the worker label is on every sample)", ["pid"],
                  registry=r).labels(str(pid)).set(1)
        self.requests = Counter("blyan_requests", "Finished requests", ["node", "status_class", "ended"], registry=r)
        self.ttfb = Histogram("blyan_time_to_first_byte_seconds", "Request start to the node's response head",
                              ["node"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("blyan_request_duration_seconds", "Request start to its end",
                                  ["node"], buckets=_LATENCY_BUCKETS, registry=r)
        self.bytes_out = Counter("blyan_response_bytes", "Response body bytes sent to clients", ["node"],
                                 registry=r)
        self.failed_attempts = Counter("blyan_failed_attempts", "Attempts that failed before the first byte",
                                       ["node", "reason"], registry=r)
        self.streams = Gauge("blyan_open_streams", "Open SSE streams and WebSockets", ["kind"], registry=r)
        self.probes = Counter("blyan_health_probes", "Health probes", ["node", "result"], registry=r)
        self.probe_seconds = Histogram("blyan_health_probe_duration_seconds", "Health probe duration", ["node"],
                                       buckets=_PROBE_BUCKETS, registry=r)
        self.workloads_calls = Counter("blyan_workloads_api_calls", "Workloads API calls by how they ended",
                                       ["outcome"], registry=r)
        self.workloads_lookups = Counter("blyan_workloads_cache_lookups",
                                         "Per-key workloads lookups: answered from the cache, or not",
                                         ["result"], registry=r)
        self.workloads_keys = Gauge("blyan_workloads_cached_keys", "API keys in the workloads cache", registry=r)
        self.tokens = Counter("blyan_tokens", "Prompt (in) and completion (out) tokens the nodes reported",
                              ["node", "model", "kind"], registry=r)
        self.queue_wait = Histogram("blyan_queue_wait_seconds", "Time requests waited for a node slot",
                                    ["outcome"], buckets=_QUEUE_BUCKETS, registry=r)
        self.rejections = Counter("blyan_admission_rejections", "Requests refused by admission, by reason",
                                  ["reason"], registry=r)
        self.queue_depth = Gauge("blyan_queue_depth", "Requests waiting for a node slot, by priority band",
                                 ["band"], registry=r)
        self._token_models: set[str] = set()
        # Bound children by metric and label values: ``labels()`` looks them up under a lock each time.
        # As bounded as the children themselves (Prometheus keeps every one it made).
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        for kind in ("sse", "websocket"):
            self.streams.labels(kind)
        self.node_gauges = _NodeGauges(node_registry, clock)
        r.register(self.node_gauges)
        r.register(_LoadGauges(node_registry, clock))

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def request_finished(self, record: FinishedRequest) -> None:
        """Count one finished request (an ``AccessRecord``)."""
        node = record.node or "-"
        child = self._child
        child(self.requests, node, f"{record.status // 100}xx", record.ended).inc()
        if record.ttfb is not None:
            child(self.ttfb, node).observe(record.ttfb)
        child(self.duration, node).observe(record.duration)
        child(self.bytes_out, node).inc(record.bytes_out)
        if record.tokens_in is not None or record.tokens_out is not None:
            model = self._token_model(record.model)
            child(self.tokens, node, model, "in").inc(record.tokens_in or 0)
            child(self.tokens, node, model, "out").inc(record.tokens_out or 0)

    def _token_model(self, model: str | None) -> str:
        if model is None:
            return "-"
        if model not in self._token_models and len(self._token_models) < MAX_TOKEN_MODELS:
            self._token_models.add(model)
        return model if model in self._token_models else "other"

    def watch_queue(self, depth_by_band: Callable[[], dict[str, int]]) -> None:
        """Read the queue's depth by band at every scrape."""
        for band in BANDS:
            self.queue_depth.labels(band).set_function(functools.partial(_band_depth, depth_by_band, band))

    def queue_left(self, seconds: float, outcome: str) -> None:
        """A request left the queue after ``seconds`` (``served``, ``timeout``, ``gone``, ``closed``)."""
        self.queue_wait.labels(outcome).observe(seconds)

    def queue_rejected(self, reason: str) -> None:
        """A request was refused by admission (``queue_full``, ``queue_timeout``, ``rate_limited``)."""
        self.rejections.labels(reason).inc()

    def attempt_failed(self, node: str, reason: str) -> None:
        """Count a failed attempt (``reason`` is one of the proxy's fixed words)."""
        self.failed_attempts.labels(node, reason).inc()

    def stream(self, kind: str, delta: int) -> None:
        """An SSE stream or WebSocket opened or closed."""
        self.streams.labels(kind).inc(delta)

    def probe(self, node: str, passed: bool, seconds: float) -> None:
        """Count one health probe."""
        self.probes.labels(node, "pass" if passed else "fail").inc()
        self.probe_seconds.labels(node).observe(seconds)

    def workloads_event(self, what: str, outcome: str) -> None:
        """Count a workloads API call (``what="api"``) or cache lookup (``"cache"``); never a key."""
        if what == "api":
            self.workloads_calls.labels(outcome).inc()
        else:
            self.workloads_lookups.labels(outcome).inc()

    def cached_keys(self, count: int) -> None:
        """How many keys the workloads cache holds."""
        self.workloads_keys.set(count)

    def render(self) -> bytes:
        """The scrape, in Prometheus text format."""
        return generate_latest(self._scraped)


class MetricsResource(Resource):
    """``GET /metrics``, behind ``METRICS_TOKEN`` when one is set (rendered without threads)."""

    isLeaf = True

    def __init__(self, metrics: ProxyMetrics, token: str | None) -> None:
        super().__init__()
        self._metrics = metrics
        self._token = token

    def render_GET(self, request: Request) -> bytes | int:
        """The scrape, or 401 (``NOT_DONE_YET``: already answered) without the token."""
        if self._token and not token_matches(presented_token(request), self._token):
            write_error(request, ProxyError(401, "unauthorized", "missing or wrong metrics token"))
            return NOT_DONE_YET
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()
