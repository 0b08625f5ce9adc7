"""What the data path is given: a frozen forwarding context, built once by ``tap`` from the settings."""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime

from blyanproxy.core import AffinitySource, AttemptRules, ForwardTrust
from blyanproxy.forward.admission import Admission
from blyanproxy.forward.traffic import TrafficRecorder
from blyanproxy.upstream import NodeEndpoints, UpstreamPool


@attrs.frozen
class ForwardRules:
    """The settings the data path reads, in seconds where the settings say milliseconds.

    ``attempts`` (``MAX_ATTEMPTS``, ``RETRY_DELAY_MS``, ``RETRY_ON_STATUS``),
    ``proxy_timeout`` (``PROXY_TIMEOUT``: to the node's response head, or
    WebSocket handshake answer), ``idle_timeout`` and ``sse_keepalive`` (a
    relayed body's), ``trust_forwarded`` and ``strip_origin`` (the headers sent
    to a node), ``affinity_key`` (``AFFINITY_KEY``) and ``ws_heartbeat``
    (TCP keep-alive probes on WebSockets; 0 for none).
    """

    attempts: AttemptRules
    proxy_timeout: float
    idle_timeout: float
    sse_keepalive: float
    trust_forwarded: ForwardTrust
    strip_origin: bool
    affinity_key: AffinitySource | None
    ws_heartbeat: float


@attrs.frozen
class ForwardContext:
    """Everything a forwarded request works with besides its node pool.

    ``clock`` (the reactor, or a test ``Clock``), ``upstream`` (the pooled HTTP
    connections to nodes), ``endpoints`` (raw connections to nodes, for
    WebSockets), ``traffic`` (the end-of-request hook, failed attempts, open
    streams), ``rules``, and ``admission`` (the slot queue and the rate limits;
    None: no admission control).
    """

    clock: IReactorTime
    upstream: UpstreamPool
    endpoints: NodeEndpoints
    traffic: TrafficRecorder
    rules: ForwardRules
    admission: Admission | None = None
