"""The admin API under ``/_admin`` (a Klein app bound to the fleet it manages).

Every route but ``/openapi.json`` and the status page ``/ui`` needs the admin
token (``X-Admin-Token`` or ``Authorization: Bearer``), compared in constant
time; a token in the query string is refused, and an address that keeps
failing is refused with 429 for a while. Every
change is taken by the state store (through the ``FleetKeeper``) before it is
applied and answered; a store that cannot take it (etcd unreachable, disk
refusing) gets 503 ``state_store_unavailable`` and the change is not applied.
Errors share the proxy's JSON shape; unknown routes are 404 and wrong
methods 405 with ``Allow``. Where a route names a node (``/nodes/{id}``,
``PUT /active``), a node's name does too when no other node has it: an id
matches first, and a name that several nodes share is 409 ``ambiguous_node``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from klein import Klein
from werkzeug.exceptions import HTTPException

from blyanproxy.admin.auth import FailureThrottle, presented_token, token_matches
from blyanproxy.admin.nodeinput import (
    new_node_fields,
    node_changes,
    parse_json_body,
    policy_name,
    strict_index,
)
from blyanproxy.admin.ui import STATUS_PAGE
from blyanproxy.admin.views import active_index, node_view, nodes_view, with_slots
from blyanproxy.core import Node, ProxyError, StoreConflict, StoreUnavailable, fleetedit, new_node_id
from blyanproxy.logs import logger

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure
    from twisted.web.iweb import IRequest
    from twisted.web.resource import Resource

    from blyanproxy.admin.views import AdmissionView, RequestTotals
    from blyanproxy.core import Change, FleetState, NodeRegistry
    from blyanproxy.fleet import Balancer, FleetKeeper, HealthMonitor

log = logger("admin")

MAX_ADMIN_BODY = 64 * 1024
OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()


class AdminAPI:
    """The admin routes; ``resource()`` is mounted at ``/_admin``."""

    app = Klein()

    def __init__(self, registry: NodeRegistry, balancer: Balancer, keeper: FleetKeeper, health: HealthMonitor,
                 counters: RequestTotals, token: str, clock: IReactorTime, throttle: FailureThrottle,
                 admission: AdmissionView | None = None) -> None:
        self._registry = registry
        self._admission = admission
        self._balancer = balancer
        self._keeper = keeper
        self._health = health
        self._counters = counters
        self._token = token
        self._clock = clock
        self._throttle = throttle

    def resource(self) -> Resource:
        """The twisted.web resource to mount."""
        return self.app.resource()

    # -- plumbing -------------------------------------------------------------

    def _client(self, request: IRequest) -> str:
        return self._throttle.address_of(request)

    def _authorize(self, request: IRequest) -> None:
        client = self._client(request)
        wait = self._throttle.retry_after(client)
        if wait is not None:
            raise ProxyError(429, "too_many_failures", "too many failed attempts; try later", retry_after=wait)
        if b"token" in request.args:
            self._throttle.failed(client)
            log.warn("admin request from {client} refused: token in the query string", client=client)
            raise ProxyError(400, "token_in_query", "send the token in X-Admin-Token, never in the URL")
        if not token_matches(presented_token(request), self._token):
            self._throttle.failed(client)
            log.warn("admin request from {client} refused: missing or wrong token", client=client)
            raise ProxyError(401, "unauthorized", "missing or wrong admin token")

    def _body(self, request: IRequest) -> Any:
        """The request's JSON document (any JSON value: the callers check its shape)."""
        request.content.seek(0)
        body = request.content.read(MAX_ADMIN_BODY + 1)
        if len(body) > MAX_ADMIN_BODY:
            raise ProxyError(413, "body_too_large", f"the body exceeds {MAX_ADMIN_BODY} bytes")
        return parse_json_body(body)

    def _json(self, request: IRequest, document: object, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(document).encode("utf-8")

    def _node(self, key: str) -> Node:
        """The node whose id is ``key``, else the one node named ``key`` (404 for none, 409 for several)."""
        node = self._registry.get(key)
        if node is not None:
            return node
        named = [node for node in self._registry.nodes() if node.name == key]
        if not named:
            raise ProxyError(404, "node_not_found", "Node not found")
        if len(named) > 1:
            raise ProxyError(409, "ambiguous_node",
                             f"{len(named)} nodes are named {key!r}: name the node by its id")
        return named[0]

    def _view(self, node: Node) -> dict:
        return node_view(node, self._registry.stats(node.id), self._clock.seconds())

    def _edit(self, change: Change) -> Deferred[FleetState]:
        """Apply a ``fleetedit`` change through the keeper; store and input failures become ``ProxyError``."""

        def refused(failure: Failure) -> Failure:
            error = failure.value
            if failure.check(StoreUnavailable):
                raise ProxyError(503, "state_store_unavailable", f"the change was not applied: {error}")
            if failure.check(StoreConflict):
                raise ProxyError(409, "conflict", "the fleet kept changing in other processes; try again")
            if failure.check(KeyError):
                raise ProxyError(404, "node_not_found", "Node not found")
            if failure.check(ValueError):
                raise ProxyError(409, "duplicate_node", f"baseURL: {error}")
            return failure

        return self._keeper.edit(change).addErrback(refused)

    @app.handle_errors(ProxyError)
    def _proxy_error(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(ProxyError, failure.value)  # the errors this handler is for
        for name, value in error.headers():
            request.setHeader(name, value)
        request.setResponseCode(error.status)
        return error.body()

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(HTTPException, failure.value)  # the errors this handler is for
        status = error.code
        assert status is not None  # every werkzeug routing error (404, 405, a redirect) has one
        for name, value in error.get_headers():  # Allow for 405, Location for a redirect
            if name.lower() != "content-type":
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        request.setHeader(b"content-type", b"application/json")
        request.setResponseCode(status)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message = {404: "no such admin route", 405: "method not allowed here"}.get(status, error.name)
        return json.dumps({"error": message, "code": code}).encode("utf-8")

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("admin request {method} {path} failed", failure,
                    method=request.method, path=request.path)
        request.setHeader(b"content-type", b"application/json")
        request.setResponseCode(500)
        return json.dumps({"error": "internal error; see the log", "code": "internal_error"}).encode()

    # -- routes -----------------------------------------------------------------

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """The OpenAPI 3.1 document of this API (no token needed: it holds no secret)."""
        request.setHeader(b"content-type", b"application/json")
        return OPENAPI

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        """The fleet: policy, active node, every node and the request counters."""
        self._authorize(request)
        now = self._clock.seconds()
        nodes = nodes_view(self._registry, now)
        with_slots(nodes, self._registry, self._balancer.cap_of)
        return self._json(request, {
            **({"admission": self._admission.view()} if self._admission is not None else {}),
            "policy": self._balancer.policy,
            "activeIndex": active_index(self._registry),
            "activeId": self._registry.active_id,
            "nodes": nodes,
            "metrics": {
                "totalRequests": self._counters.requests,
                "failedRequests": self._counters.failures,
                "nodeStats": {n["id"]: {"requests": n["requests"], "failures": n["failures"],
                                        "inFlight": n["inFlight"]} for n in nodes},
            },
        })

    @app.route("/admission", methods=["GET"])
    def admission(self, request: IRequest) -> bytes:
        """The queue for node slots, the rate limits, and each caller's totals (keys by hash only)."""
        self._authorize(request)
        view = self._admission.view() if self._admission is not None else {"queue": None, "callers": {}}
        return self._json(request, view)

    @app.route("/nodes", methods=["GET"])
    def list_nodes(self, request: IRequest) -> bytes:
        """Every node with its live figures."""
        self._authorize(request)
        return self._json(request, {"nodes": nodes_view(self._registry, self._clock.seconds())})

    @app.route("/nodes", methods=["POST"])
    def add_node(self, request: IRequest) -> Deferred[bytes]:
        """Add a node (a new id; the body gives its fields)."""
        self._authorize(request)
        fields = new_node_fields(self._body(request))
        node = Node(id=new_node_id(), added_at=self._clock.seconds(), **fields)

        def added(_: object) -> bytes:
            log.info("node {name} added by {client}", name=node.name, client=self._client(request))
            return self._json(request, {"success": True, "node": self._view(self._node(node.id))})

        return self._edit(fleetedit.add_node(node)).addCallback(added)

    @app.route("/nodes/<key>", methods=["GET"])
    def get_node(self, request: IRequest, key: str) -> bytes:
        """One node (by id, or by a name no other node has) with its live figures."""
        self._authorize(request)
        return self._json(request, {"node": self._view(self._node(key))})

    @app.route("/nodes/<key>", methods=["PATCH"])
    def change_node(self, request: IRequest, key: str) -> Deferred[bytes]:
        """Change some of a node's fields (its name too: answered by id)."""
        self._authorize(request)
        node_id = self._node(key).id
        changes = node_changes(self._body(request))

        def changed(_: object) -> bytes:
            node = self._node(node_id)
            log.info("node {name} changed by {client}: {fields}", name=node.name, client=self._client(request),
                     fields=", ".join(sorted(changes)) or "nothing")
            return self._json(request, {"success": True, "node": self._view(node)})

        return self._edit(fleetedit.update_node(node_id, **changes)).addCallback(changed)

    @app.route("/nodes/<key>", methods=["DELETE"])
    def remove_node(self, request: IRequest, key: str) -> Deferred[bytes]:
        """Remove a node."""
        self._authorize(request)
        node = self._node(key)

        def removed(_: object) -> bytes:
            log.info("node {name} removed by {client}", name=node.name, client=self._client(request))
            return self._json(request, {"success": True})

        return self._edit(fleetedit.remove_node(node.id)).addCallback(removed)

    @app.route("/nodes/<key>/drain", methods=["POST"])
    def drain_node(self, request: IRequest, key: str) -> Deferred[bytes]:
        """Drain a node: it takes no new requests."""
        self._authorize(request)
        node_id = self._node(key).id

        def drained(_: object) -> bytes:
            node = self._node(node_id)
            log.info("node {name} draining, by {client}", name=node.name, client=self._client(request))
            return self._json(request, {"success": True, "node": self._view(node)})

        return self._edit(fleetedit.update_node(node_id, draining=True)).addCallback(drained)

    @app.route("/active/<index>", methods=["POST"])
    def set_active_index(self, request: IRequest, index: str) -> Deferred[bytes]:
        """Make the node at ``index`` (registry order) the active one."""
        self._authorize(request)
        position = strict_index(index)
        nodes = self._registry.nodes()
        if position >= len(nodes):
            raise ProxyError(400, "invalid_field", f"index: there are {len(nodes)} nodes")
        return self._set_active(request, nodes[position].id)

    @app.route("/active", methods=["PUT"])
    def set_active_id(self, request: IRequest) -> Deferred[bytes]:
        """Make the node the body names (``{"id": ...}``: an id, or a name no other node has) the active one."""
        self._authorize(request)
        document = self._body(request)
        if not isinstance(document, dict) or set(document) != {"id"} or not isinstance(document["id"], str):
            raise ProxyError(400, "invalid_field", 'id: expected {"id": "<node id or name>"}')
        return self._set_active(request, self._node(document["id"]).id)

    def _set_active(self, request: IRequest, node_id: str) -> Deferred[bytes]:
        def done(_: object) -> bytes:
            log.info("active node set to {node} by {client}", node=self._node(node_id).name,
                     client=self._client(request))
            return self._json(request, {"success": True, "activeIndex": active_index(self._registry),
                                        "activeId": node_id})

        return self._edit(fleetedit.set_active(node_id)).addCallback(done)

    @app.route("/health-check", methods=["POST"])
    def health_check(self, request: IRequest) -> Deferred[bytes]:
        """Probe every node now; answers once done."""
        self._authorize(request)
        done = self._health.check_now()
        return done.addCallback(lambda _: self._json(
            request, {"success": True, "nodes": nodes_view(self._registry, self._clock.seconds())}
        ))

    @app.route("/policy", methods=["GET"])
    def get_policy(self, request: IRequest) -> bytes:
        """The selection policy in use."""
        self._authorize(request)
        return self._json(request, {"policy": self._balancer.policy})

    @app.route("/policy", methods=["PUT"])
    def set_policy(self, request: IRequest) -> Deferred[bytes]:
        """Set the selection policy (through the store, like every change)."""
        self._authorize(request)
        name = policy_name(self._body(request))

        def done(_: object) -> bytes:
            log.info("policy set to {policy} by {client}", policy=name, client=self._client(request))
            return self._json(request, {"success": True, "policy": name})

        return self._edit(fleetedit.set_policy(name)).addCallback(done)

    @app.route("/ui", methods=["GET"])
    def status_page(self, request: IRequest) -> bytes:
        """The status page for people (no token needed to load it: it asks, and its API calls carry it)."""
        for name, value in STATUS_PAGE.headers:
            request.setHeader(name, value)
        return STATUS_PAGE.body
