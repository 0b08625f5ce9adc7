"""The forwarding resource: every request that is not for the proxy itself goes to a node."""

from __future__ import annotations

import attrs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from blyanproxy.core import (
    ProxyError,
    Route,
    affinity_key,
    model_of,
    names_model,
    parse_route,
    write_error,
)
from blyanproxy.discovery import KeyRecord, WorkloadDirectory, api_key_of, missing_key_error
from blyanproxy.fleet import Balancer, Caller, LeasePool
from blyanproxy.forward import traffic
from blyanproxy.forward.context import ForwardContext
from blyanproxy.forward.exchange import Exchange
from blyanproxy.forward.models import answer_models
from blyanproxy.forward.websocket import forward_websocket, is_websocket_upgrade


def body_of(request: Request) -> bytes:
    """The whole body of ``request`` (twisted.web has read it before the resource renders)."""
    content = request.content
    assert content is not None
    content.seek(0)
    return content.read()


def with_model(route: Route, method: bytes, body: bytes) -> Route:
    """``route`` with the model its JSON ``body`` names, and the body for its prefix key
    (``Route.prefix_key``), for a POST to an inference path (``names_model``)."""
    if not names_model(route, method):
        return route
    return route.naming(model_of(body), body)


class ProxyResource(Resource):
    """The twisted.web resource that forwards requests to nodes (a leaf: it sees every path).

    With a ``directory`` (workload discovery on), a request carrying an API
    key goes to that key's workloads; one without goes to the registry, or
    is refused 401 when the registry has no node. A request naming a model
    goes to a node serving it (``with_model``); the model list is the
    proxy's own answer (``forward.models``).
    """

    isLeaf = True

    def __init__(self, context: ForwardContext, balancer: Balancer,
                 directory: WorkloadDirectory | None = None) -> None:
        super().__init__()
        self._context = context
        self._balancer = balancer
        self._directory = directory

    def render(self, request: Request) -> int:
        """Send the request on to a node (the answer comes later: ``NOT_DONE_YET``)."""
        request.defaultContentType = None
        tally = self._context.traffic.begin(request)
        directory = self._directory
        try:
            route = parse_route(request.uri)
            key = api_key_of(request.requestHeaders) if directory is not None else None
            if key is None and directory is not None and self._balancer.is_empty():
                raise missing_key_error()
            if key is None and not self._balancer.serves(route):
                raise ProxyError(404, "node_not_found", "no registered node has the id or name api= gives",
                                 param="api")
        except ProxyError as err:
            self._refuse(request, tally, err)
            return NOT_DONE_YET
        affinity = affinity_key(self._context.rules.affinity_key, request)
        if affinity is not None:
            route = attrs.evolve(route, affinity_key=affinity)
        body = body_of(request)
        route = with_model(route, request.method, body)
        tally.model = route.model
        caller = None
        if self._context.admission is not None:
            try:
                caller = self._context.admission.admit(request, tally)
            except ProxyError as err:
                self._refuse(request, tally, err)
                return NOT_DONE_YET
        if directory is None or key is None:
            self._forward(request, tally, route, body, self._balancer, caller)
        else:
            self._forward_keyed(directory, request, tally, route, body, key, caller)
        return NOT_DONE_YET

    def _forward(self, request: Request, tally: traffic.RequestTally, route: Route, body: bytes, pool: LeasePool,
                 caller: Caller | None = None) -> None:
        """Send the request to a node of ``pool`` (the registry's ``Balancer`` or a ``KeyPool``)."""
        try:
            pool.check(route)
        except ProxyError as err:
            self._refuse(request, tally, err)
            return
        if answer_models(request, tally, route, pool):
            return
        if is_websocket_upgrade(request):
            forward_websocket(self._context, request, tally, route, pool)
        else:
            Exchange(self._context, request, tally, route, body, pool, caller).start()

    def _forward_keyed(self, directory: WorkloadDirectory, request: Request, tally: traffic.RequestTally, route: Route,
                       body: bytes, key: bytes, caller: Caller | None = None) -> None:
        """Find the key's workloads (perhaps asking the API), then forward among them."""

        def found(record: KeyRecord) -> None:
            try:
                pool = directory.pool(record)
            except ProxyError as err:
                self._refuse(request, tally, err)
                return
            directory.started(record)
            request.notifyFinish().addBoth(record.finished)
            self._forward(request, tally, route, body, pool, caller)

        def gone() -> None:
            tally.end(traffic.CLIENT_CLOSED_STATUS, traffic.CLIENT_GONE)

        ended = request.notifyFinish()  # asked first: the lookup may answer, and end the request, at once
        leave = directory.lookup_for(key, found, lambda err: self._refuse(request, tally, err), gone,
                                     client=tally.client.origin)
        ended.addErrback(lambda _: leave())

    def _refuse(self, request: Request, tally: traffic.RequestTally, err: ProxyError) -> None:
        """Answer ``err`` for a request no node was chosen for."""
        write_error(request, err)
        tally.bytes_out = request.sentLength  # the proxy's own answer's body
        tally.end(err.status, traffic.ERROR)
