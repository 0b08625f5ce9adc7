"""The public, read-only status endpoints: ``/health`` and ``/_status`` (no token, never forwarded)."""

from __future__ import annotations

import json

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .errors import ProxyError, write_error
from .views import usable_count


class _JSONView(Resource):
    """A GET-only resource answering one JSON document."""

    isLeaf = True

    def _document(self) -> tuple:
        raise NotImplementedError

    def render_GET(self, request):
        status, document = self._document()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(document).encode("utf-8")

    render_HEAD = render_GET

    def render(self, request):
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        request.setHeader(b"allow", b"GET, HEAD")
        write_error(request, ProxyError(405, "method_not_allowed", "only GET and HEAD here"))
        return NOT_DONE_YET


class HealthView(_JSONView):
    """``/health``: 200 while at least one node can take requests, else 503."""

    def __init__(self, registry, clock) -> None:
        super().__init__()
        self._registry = registry
        self._clock = clock
        self._started = clock.seconds()

    def _document(self) -> tuple:
        now = self._clock.seconds()
        usable = usable_count(self._registry, now)
        return (200 if usable else 503), {
            "status": "healthy" if usable else "degraded",
            "nodes": len(self._registry.nodes()),
            "healthyNodes": usable,
            "uptime": round(now - self._started, 3),
        }


class StatusView(_JSONView):
    """``/_status``: node counts, the policy and the request counters."""

    def __init__(self, registry, balancer, counters, clock) -> None:
        super().__init__()
        self._registry = registry
        self._balancer = balancer
        self._counters = counters
        self._clock = clock

    def _document(self) -> tuple:
        return 200, {
            "healthy": usable_count(self._registry, self._clock.seconds()),
            "total": len(self._registry.nodes()),
            "policy": self._balancer.policy,
            "metrics": {"requests": self._counters.requests, "failures": self._counters.failures},
        }
