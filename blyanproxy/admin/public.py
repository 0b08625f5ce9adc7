"""The public, read-only endpoints: ``/health``, ``/_status`` (no token, never forwarded), and with
workload discovery ``/`` (a liveness answer) and ``/workloads`` (the caller's workloads)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from blyanproxy.admin.views import usable_count
from blyanproxy.core import ForwardTrust, ProxyError, client_facts, write_error
from blyanproxy.discovery import api_key_of, missing_key_error

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.server import Request

    from blyanproxy.admin.views import RequestTotals
    from blyanproxy.core import NodeRegistry
    from blyanproxy.discovery import WorkloadDirectory
    from blyanproxy.fleet import Balancer

#: A JSON view's answer: the HTTP status and the document.
Answer = tuple[int, dict[str, object]]


def _refuse_method(request: Request, allowed: bytes) -> int:
    """Answer 405 with ``Allow: allowed`` (the JSON error shape)."""
    request.setHeader(b"allow", allowed)
    write_error(request, ProxyError(405, "method_not_allowed", f"only {allowed.decode()} here"))
    return NOT_DONE_YET


class _JSONView(Resource):
    """A GET-only resource answering one JSON document."""

    isLeaf = True

    def _document(self) -> Answer:
        raise NotImplementedError

    def render_GET(self, request: Request) -> bytes:
        """The document as JSON, never cached."""
        status, document = self._document()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(document).encode("utf-8")

    render_HEAD = render_GET

    def render(self, request: Request) -> bytes | int:
        """GET and HEAD answer; other methods get 405."""
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        return _refuse_method(request, b"GET, HEAD")


class HealthView(_JSONView):
    """``/health``: 200 while at least one node can take requests, else 503."""

    def __init__(self, registry: NodeRegistry, clock: IReactorTime) -> None:
        super().__init__()
        self._registry = registry
        self._clock = clock
        self._started = clock.seconds()

    def _document(self) -> Answer:
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

    def __init__(
        self, registry: NodeRegistry, balancer: Balancer, counters: RequestTotals, clock: IReactorTime
    ) -> None:
        super().__init__()
        self._registry = registry
        self._balancer = balancer
        self._counters = counters
        self._clock = clock

    def _document(self) -> Answer:
        return 200, {
            "healthy": usable_count(self._registry, self._clock.seconds()),
            "total": len(self._registry.nodes()),
            "policy": self._balancer.policy,
            "metrics": {"requests": self._counters.requests, "failures": self._counters.failures},
        }


class LivenessView(_JSONView):
    """``GET /`` with workload discovery on: ``{"status": "healthy", "time": …}`` (no key needed).

    Other methods on ``/`` are forwarded (``RootResource`` reads ``only_methods``).
    """

    only_methods = (b"GET", b"HEAD")

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self._clock = clock

    def _document(self) -> Answer:
        now = datetime.fromtimestamp(self._clock.seconds(), timezone.utc)
        return 200, {"status": "healthy", "time": now.strftime("%Y-%m-%dT%H:%M:%SZ")}


class WorkloadsView(Resource):
    """``GET /workloads``: the caller's workloads as the API listed them (running or not).

    ``trust`` (``TRUST_FORWARDED``) says which client address a first lookup
    of an unknown key is counted against.
    """

    isLeaf = True

    def __init__(self, directory: WorkloadDirectory, trust: bool | ForwardTrust = False) -> None:
        super().__init__()
        self._directory = directory
        self._trust = trust

    def render_GET(self, request: Request) -> int:
        """Look the caller's key up, then answer with its workloads (or the JSON error)."""
        try:
            key = api_key_of(request.requestHeaders)
            if key is None:
                raise missing_key_error()
        except ProxyError as err:
            write_error(request, err)
            return NOT_DONE_YET

        def answer(record) -> None:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps([item.as_json() for item in record.state.workloads]).encode("utf-8"))
            request.finish()

        ended = request.notifyFinish()  # asked first: a cached list is answered at once
        leave = self._directory.lookup_for(key, answer, lambda err: write_error(request, err), lambda: None,
                                           client=client_facts(request, self._trust).origin)
        ended.addErrback(lambda _: leave())
        return NOT_DONE_YET

    render_HEAD = render_GET

    def render(self, request: Request) -> bytes | int:
        """GET and HEAD answer; other methods get 405."""
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        return _refuse_method(request, b"GET, HEAD")
