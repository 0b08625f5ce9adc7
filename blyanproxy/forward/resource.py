"""The forwarding resource: every request that is not for the proxy itself goes to a node."""

from __future__ import annotations

import attrs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from blyanproxy.core import (
    ProxyError,
    Route,
    affinity_key,
    parse_route,
    write_error,
)
from blyanproxy.discovery import WorkloadDirectory, api_key_of, missing_key_error
from blyanproxy.fleet import Balancer, LeasePool
from blyanproxy.forward import traffic
from blyanproxy.forward.context import ForwardContext
from blyanproxy.forward.exchange import Exchange
from blyanproxy.forward.websocket import forward_websocket, is_websocket_upgrade


class ProxyResource(Resource):
    """The twisted.web resource that forwards requests to nodes (a leaf: it sees every path).

    With a ``directory`` (workload discovery on), a request carrying an API
    key goes to that key's workloads; one without goes to the registry, or
    is refused 401 when the registry has no node.
    """

    isLeaf = True

    def __init__(self, context: ForwardContext, balancer: Balancer,
                 directory: WorkloadDirectory | None = None) -> None:
        super().__init__()
        self._context = context
        self._balancer = balancer
        self._directory = directory

    def render(self, request):
        request.defaultContentType = None
        tally = self._context.traffic.begin(request)
        directory = self._directory
        try:
            route = parse_route(request.uri)
            key = api_key_of(request.requestHeaders) if directory is not None else None
            if key is None and directory is not None and self._balancer.is_empty():
                raise missing_key_error()
            if key is None and not self._balancer.serves(route):
                raise ProxyError(404, "node_not_found", "no registered node has the id or name api= gives")
        except ProxyError as err:
            self._refuse(request, tally, err)
            return NOT_DONE_YET
        affinity = affinity_key(self._context.rules.affinity_key, request)
        if affinity is not None:
            route = attrs.evolve(route, affinity_key=affinity)
        if directory is None or key is None:
            self._forward(request, tally, route, self._balancer)
        else:
            self._forward_keyed(directory, request, tally, route, key)
        return NOT_DONE_YET

    def _forward(self, request, tally: traffic.RequestTally, route: Route, pool: LeasePool) -> None:
        """Send the request to a node of ``pool`` (the registry's ``Balancer`` or a ``KeyPool``)."""
        try:
            pool.check(route)
        except ProxyError as err:
            self._refuse(request, tally, err)
            return
        if is_websocket_upgrade(request):
            forward_websocket(self._context, request, tally, route, pool)
        else:
            Exchange(self._context, request, tally, route, pool).start()

    def _forward_keyed(self, directory: WorkloadDirectory, request, tally: traffic.RequestTally, route: Route,
                       key: bytes) -> None:
        """Find the key's workloads (perhaps asking the API), then forward among them."""

        def found(record) -> None:
            try:
                pool = directory.pool(record)
            except ProxyError as err:
                self._refuse(request, tally, err)
                return
            directory.started(record)
            request.notifyFinish().addBoth(record.finished)
            self._forward(request, tally, route, pool)

        def gone() -> None:
            tally.end(traffic.CLIENT_CLOSED_STATUS, traffic.CLIENT_GONE)

        ended = request.notifyFinish()  # asked first: the lookup may answer, and end the request, at once
        leave = directory.lookup_for(key, found, lambda err: self._refuse(request, tally, err), gone,
                                     client=tally.client.origin)
        ended.addErrback(lambda _: leave())

    def _refuse(self, request, tally: traffic.RequestTally, err: ProxyError) -> None:
        """Answer ``err`` for a request no node was chosen for."""
        write_error(request, err)
        tally.end(err.status, traffic.ERROR)
