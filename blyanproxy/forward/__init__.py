"""forward."""

from __future__ import annotations

from blyanproxy.forward.resource import ProxyResource
from blyanproxy.forward.traffic import (
    CLIENT_CLOSED_STATUS,
    CLIENT_GONE,
    COMPLETE,
    AccessRecord,
    TrafficRecorder,
)

__all__ = [
    "AccessRecord",
    "CLIENT_CLOSED_STATUS",
    "CLIENT_GONE",
    "COMPLETE",
    "ProxyResource",
    "TrafficRecorder",
]
