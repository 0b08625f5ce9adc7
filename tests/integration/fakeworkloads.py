"""A fake workloads API on 127.0.0.1: per-key answers it can change, and failure modes."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

#: How the fake answers every call.
ANSWER = "answer"  # the key's list, or 401 for an unknown key
FAIL = "fail"  # 500
HANG = "hang"  # never answers
GARBAGE = "garbage"  # 200 with a body that is not a workloads list


def workload(node: str, tags=(), running=True, status="running", name=None) -> dict:
    """One workload as the API lists it; ``node`` is ``host:port``."""
    return {
        "created": 1735689600, "expires": 1735776000, "node": node, "running": running,
        "status": status, "type": "ollama_webui:large", "workload": name or f"wl-{node}", "tags": list(tags),
    }


class FakeWorkloadsAPI(Resource):
    """``POST /api/v0/workloads``: records every call's key; answers per ``mode``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict = {}
        self.calls: list = []
        self.bodies: list = []
        self.mode = ANSWER
        self.hung: list = []
        self.url = ""

    def set(self, key: str, workloads: list) -> None:
        """What the API lists for ``key`` from now on."""
        self.answers[key] = workloads

    def calls_for(self, key: str) -> int:
        """How many calls carried ``key``."""
        return self.calls.count(key)

    def render_POST(self, request):
        if request.path != b"/api/v0/workloads":
            request.setResponseCode(404)
            return b"{}"
        key = (request.getHeader(b"x-c3-api-key") or b"").decode("latin-1")
        self.calls.append(key)
        self.bodies.append(request.content.read())
        request.setHeader(b"content-type", b"application/json")
        if self.mode == HANG:
            self.hung.append(request)
            return NOT_DONE_YET
        if self.mode == FAIL:
            request.setResponseCode(500)
            return b'{"detail": "internal error"}'
        if self.mode == GARBAGE:
            return b'{"workloads": "not a list"'
        if key not in self.answers:
            request.setResponseCode(401)
            return b'{"detail": "invalid api key"}'
        return json.dumps(self.answers[key]).encode()


@pytest_twisted.async_yield_fixture()
async def workloads_api(reactor):
    """A running ``FakeWorkloadsAPI``; its ``url`` is the value for ``API_URL``."""
    api = FakeWorkloadsAPI()
    connections = WrappingFactory(Site(api))
    port = reactor.listenTCP(0, connections, interface="127.0.0.1")
    api.url = f"http://127.0.0.1:{port.getHost().port}/api/v0"
    yield api
    await port.stopListening()
    for protocol in list(connections.protocols):
        protocol.transport.abortConnection()
