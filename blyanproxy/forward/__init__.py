"""The data path: the forwarding resource, one exchange per request, failover, streaming relay,
WebSocket splice, and the end-of-request hook."""

from __future__ import annotations

from blyanproxy.forward.admission import Admission, CallerUsage
from blyanproxy.forward.context import ForwardContext, ForwardRules
from blyanproxy.forward.resource import ProxyResource
from blyanproxy.forward.traffic import (
    CLIENT_CLOSED_STATUS,
    CLIENT_GONE,
    COMPLETE,
    FAILED_ENDINGS,
    AccessRecord,
    RequestCounters,
    RequestTally,
    RequestWatcher,
    TrafficRecorder,
    write_access_line,
)

__all__ = [
    "AccessRecord",
    "Admission",
    "CallerUsage",
    "CLIENT_CLOSED_STATUS",
    "CLIENT_GONE",
    "COMPLETE",
    "FAILED_ENDINGS",
    "ForwardContext",
    "ForwardRules",
    "ProxyResource",
    "RequestCounters",
    "RequestTally",
    "RequestWatcher",
    "TrafficRecorder",
    "write_access_line",
]
