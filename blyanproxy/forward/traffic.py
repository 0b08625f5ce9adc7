"""What the data path reports when a request ends: one access log line and the traffic metrics.

``TrafficRecorder.finished`` is called exactly once per request, when it ends
(a stream when it ends, not when it starts). The access log line is
greppable ``key=value`` text; query values are replaced by ``…`` because they
may hold secrets, and no header (so no token or API key) is ever logged.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import attrs

from blyanproxy.logs import logger

log = logger("access")

#: How a request ended.
COMPLETE = "complete"
CLIENT_GONE = "client_gone"
UPSTREAM_BROKE = "upstream_broke"
TIMEOUT = "timeout"
ERROR = "error"

#: The status logged for a client that left before any answer (nginx's convention).
CLIENT_CLOSED_STATUS = 499


@attrs.frozen
class AccessRecord:
    """One finished request."""

    method: str
    target: bytes
    status: int
    node: str | None
    attempts: int
    ttfb: float | None
    duration: float
    bytes_out: int
    ended: str
    client: str


def redacted_target(target: bytes) -> str:
    """The path with every query value replaced by ``…`` (names kept, for grepping)."""
    path, sep, query = target.partition(b"?")
    text = path.decode("latin-1")
    if not sep:
        return text
    names = [name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    return text + "?" + "&".join(f"{name}=…" for name in names)


def access_line(record: AccessRecord) -> str:
    """The access log line of ``record``."""
    ttfb = "-" if record.ttfb is None else f"{record.ttfb * 1000:.1f}"
    return (
        f"{record.client} {record.method} {redacted_target(record.target)} status={record.status} "
        f"node={record.node or '-'} attempts={record.attempts} ttfb_ms={ttfb} "
        f"duration_ms={record.duration * 1000:.1f} bytes_out={record.bytes_out} ended={record.ended}"
    )


@attrs.define
class RequestCounters:
    """Requests the proxy took, and those it answered with its own error or cut short."""

    requests: int = 0
    failures: int = 0


class TrafficRecorder:
    """Writes access log lines (unless turned off) and feeds ``metrics`` (a ``ProxyMetrics`` or None)."""

    def __init__(self, metrics=None, access_log: bool = True) -> None:
        self._metrics = metrics
        self._access_log = access_log

    def finished(self, record: AccessRecord) -> None:
        """A request ended."""
        if self._access_log:
            log.info("{line}", line=access_line(record))
        if self._metrics is not None:
            self._metrics.request_finished(record)

    def attempt_failed(self, node: str, reason: str) -> None:
        """One attempt on ``node`` failed before any byte reached the client."""
        if self._metrics is not None:
            self._metrics.attempt_failed(node, reason)

    def stream(self, kind: str, delta: int) -> None:
        """An SSE stream or WebSocket (``kind``) opened (+1) or closed (-1)."""
        if self._metrics is not None:
            self._metrics.stream(kind, delta)
