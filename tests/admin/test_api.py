"""The admin API as a Klein resource driven by StubTreq: the token, every route's answer and refusals.

The fleet is real (``NodeRegistry``, ``Balancer``, ``FleetKeeper``, a ``HealthMonitor``
probing through StubTreq) over a store that can be told to refuse or to keep
losing races; time is a ``Clock``. No socket is opened.
"""

import json
import re
import types

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from blyanproxy.admin import AdminAPI, FailureThrottle
from blyanproxy.core import HealthRules, Node, NodeRegistry, StoreConflict, StoreUnavailable
from blyanproxy.fleet import Balancer, FleetKeeper, HealthMonitor
from blyanproxy.store import MemoryStore

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"X-Admin-Token": TOKEN}
OPENAPI_PATH = "blyanproxy/admin/openapi.json"


class Store(MemoryStore):
    """Holds what it took; ``refusing`` fails every commit, ``racing`` loses every race to another process."""

    def __init__(self):
        self.held = None
        self.commits = 0
        self.refusing = False
        self.racing = False

    def commit(self, state):
        self.commits += 1
        if self.refusing:
            return fail(StoreUnavailable("etcd is unreachable"))
        if self.racing:
            return fail(StoreConflict(self.held))
        self.held = state
        return succeed(state)

    def flush(self, state):
        self.held = state


class NodeHealth(Resource):
    """What every node answers on a health path: ``status``."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.status = 200

    def render_GET(self, request):
        request.setResponseCode(self.status)
        return b"ok"


@attrs.define
class Admin:
    """One admin API over a real fleet, and a StubTreq client of it."""

    clock: Clock
    registry: NodeRegistry
    balancer: Balancer
    store: Store
    nodes: NodeHealth
    stub: StubTreq
    health: object = None

    def call(self, method, path, body=None, raw=None, headers=AUTH):
        """``(status, headers, JSON document)`` of one request to ``/_admin{path}``."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        answers = []
        requested = self.stub.request(method, "http://proxy.test" + path, data=data, headers=headers)
        requested.addCallback(lambda response: self.stub.content(response).addCallback(
            lambda content: answers.append((response.code, response.headers, content))))
        requested.addErrback(answers.append)
        self.stub.flush()
        code, response_headers, content = answers[0]
        return code, response_headers, (json.loads(content) if content else None)

    def fleet(self):
        """What a refused request must leave as it was."""
        return ([(node, self.registry.stats(node.id).requests) for node in self.registry.nodes()],
                self.registry.active_id, self.balancer.policy, self.store.held)


def node(index, **fields):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


def build(nodes=(), counters=None, health=None, admission=None):
    clock = Clock()
    clock.advance(1000)
    registry = NodeRegistry()
    balancer = Balancer(registry, clock)
    store = Store()
    keeper = FleetKeeper(registry, balancer, store)
    keeper.restore(nodes)
    node_health = NodeHealth()
    if health is None:
        health = HealthMonitor(registry, StubTreq(node_health), clock, 5.0, 1.0, ("/health",),
                               frozenset({200}), HealthRules())
    counters = counters or types.SimpleNamespace(requests=0, failures=0)
    api = AdminAPI(registry, balancer, keeper, health, counters, TOKEN, clock, FailureThrottle(clock), admission)
    return Admin(clock, registry, balancer, store, node_health, StubTreq(api.resource()), health)


@pytest.fixture
def admin():
    return build([node(1), node(2)])


# -- the token ----------------------------------------------------------------------------

ROUTES = [
    ("GET", "/status", None),
    ("GET", "/nodes", None),
    ("POST", "/nodes", {"name": "x", "baseURL": "http://10.0.0.9:8000"}),
    ("GET", "/nodes/n1", None),
    ("PATCH", "/nodes/n1", {"name": "x"}),
    ("DELETE", "/nodes/n1", None),
    ("POST", "/nodes/n1/drain", None),
    ("POST", "/active/0", None),
    ("PUT", "/active", {"id": "n1"}),
    ("POST", "/health-check", None),
    ("GET", "/policy", None),
    ("PUT", "/policy", {"policy": "round-robin"}),
    ("GET", "/admission", None),
]


@pytest.mark.parametrize("method, path, body", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"X-Admin-Token": "guess"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"X-Admin-Token": TOKEN[:-1]}])
def test_every_route_refuses_a_missing_or_wrong_token_and_changes_nothing(admin, method, path, body, headers):
    before = admin.fleet()
    code, response_headers, answer = admin.call(method, path, body, headers=headers)
    assert (code, answer["code"]) == (401, "unauthorized")
    assert response_headers.getRawHeaders("content-type") == ["application/json"]
    assert admin.fleet() == before and admin.store.commits == 0


@pytest.mark.parametrize("headers", [AUTH, {"Authorization": f"Bearer {TOKEN}"}])
def test_either_header_carries_the_token(admin, headers):
    assert admin.call("GET", "/policy", headers=headers)[0] == 200


def test_a_token_in_the_query_string_is_refused_even_when_right(admin):
    code, _, answer = admin.call("GET", f"/status?token={TOKEN}", headers={})
    assert (code, answer["code"]) == (400, "token_in_query")
    code, _, answer = admin.call("GET", f"/status?token={TOKEN}")
    assert (code, answer["code"]) == (400, "token_in_query")


def test_repeated_failures_are_refused_for_a_while_even_with_the_right_token(admin):
    for _ in range(9):
        assert admin.call("GET", "/status", headers={"X-Admin-Token": "guess"})[0] == 401
    admin.call("GET", f"/status?token={TOKEN}", headers={})  # the tenth failure
    code, headers, answer = admin.call("GET", "/status")
    assert (code, answer["code"]) == (429, "too_many_failures")
    assert headers.getRawHeaders("retry-after") == ["60"]
    admin.clock.advance(59)
    assert admin.call("GET", "/status")[0] == 429
    admin.clock.advance(1)
    assert admin.call("GET", "/status")[0] == 200


def test_the_token_never_reaches_the_log(admin):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        admin.call("GET", "/status", headers={"X-Admin-Token": TOKEN + "x"})
        admin.call("GET", f"/status?token={TOKEN}", headers={})
        admin.call("POST", "/nodes", {"name": "n", "baseURL": "http://10.7.0.1:1"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(event) + repr(event) for event in events)
    assert "refused" in text and "added" in text
    assert TOKEN not in text


# -- the routes ---------------------------------------------------------------------------

def test_status_shows_the_fleet_and_the_request_counters():
    admin = build([node(1), node(2)], counters=types.SimpleNamespace(requests=7, failures=2))
    admin.registry.stats("n2").requests = 5
    admin.registry.stats("n2").in_flight = 1
    admin.registry.active_id = "n2"
    code, headers, status = admin.call("GET", "/status")
    assert code == 200 and headers.getRawHeaders("cache-control") == ["no-store"]
    assert (status["policy"], status["activeIndex"], status["activeId"]) == ("active-first", 1, "n2")
    assert [n["id"] for n in status["nodes"]] == ["n1", "n2"]
    assert status["metrics"] == {
        "totalRequests": 7, "failedRequests": 2,
        "nodeStats": {"n1": {"requests": 0, "failures": 0, "inFlight": 0},
                      "n2": {"requests": 5, "failures": 0, "inFlight": 1}},
    }


class AdmissionFigures:
    def view(self):
        return {"queue": {"depth": 2}, "callers": {"key-0123456789": {"requests": 3}}}


def test_status_and_admission_show_caps_slots_and_the_queue():
    admin = build([node(1, max_inflight=4), node(2)], admission=AdmissionFigures())
    admin.registry.stats("n1").in_flight = 3
    code, _, status = admin.call("GET", "/status")
    assert code == 200 and status["admission"]["queue"] == {"depth": 2}
    first, second = status["nodes"]
    assert (first["maxInflight"], first["slots"], first["queue"]) == (4, {"inUse": 3, "cap": 4}, "3/4 slots in use")
    assert "slots" not in second and second["maxInflight"] is None
    assert admin.call("GET", "/admission")[2] == AdmissionFigures().view()
    assert build([node(1)]).call("GET", "/admission")[2] == {"queue": None, "callers": {}}


def test_nodes_are_listed_in_registry_order_with_live_figures(admin):
    admin.registry.stats("n1").failures = 3
    code, _, answer = admin.call("GET", "/nodes")
    assert code == 200
    assert [(n["id"], n["name"], n["failures"]) for n in answer["nodes"]] == [("n1", "node1", 3),
                                                                              ("n2", "node2", 0)]


def test_a_node_is_added_through_the_store_and_answered_with_its_view(admin):
    code, _, answer = admin.call("POST", "/nodes", {"name": " gpu-a ", "baseURL": "http://10.0.0.9:8000/",
                                                    "tags": ["a100"], "weight": 3, "metadata": {"gpu": "A100"}})
    assert code == 200 and answer["success"] is True
    added = answer["node"]
    assert re.fullmatch(r"[0-9a-f]{16}", added["id"])
    assert (added["name"], added["baseURL"], added["tags"], added["weight"], added["metadata"]) == (
        "gpu-a", "http://10.0.0.9:8000", ["a100"], 3, {"gpu": "A100"})
    assert added["addedAt"] == 1000000 and added["state"] == "unknown" and added["requests"] == 0
    assert [n.id for n in admin.registry.nodes()] == ["n1", "n2", added["id"]]
    assert [n.id for n in admin.store.held.nodes] == ["n1", "n2", added["id"]]
    assert admin.call("GET", f"/nodes/{added['id']}")[2] == {"node": added}


def test_a_node_is_changed(admin):
    code, _, answer = admin.call("PATCH", "/nodes/n2", {"name": "renamed", "weight": 4, "tags": ["h100"]})
    assert code == 200 and answer["success"] is True
    assert (answer["node"]["name"], answer["node"]["weight"], answer["node"]["tags"]) == ("renamed", 4, ["h100"])
    assert admin.registry.get("n2").name == "renamed" and admin.store.held.nodes[1].weight == 4
    assert admin.call("PATCH", "/nodes/n2", {})[0] == 200  # nothing to change is no error
    assert admin.registry.get("n2").name == "renamed"


def test_a_node_is_drained_and_kept(admin):
    code, _, answer = admin.call("POST", "/nodes/n1/drain")
    assert code == 200 and answer["node"]["draining"] is True and answer["node"]["usable"] is False
    assert admin.registry.get("n1").draining is True and admin.store.held.nodes[0].draining is True


def test_a_node_is_removed_and_stops_being_active(admin):
    admin.call("PUT", "/active", {"id": "n1"})
    code, _, answer = admin.call("DELETE", "/nodes/n1")
    assert (code, answer) == (200, {"success": True})
    assert [n.id for n in admin.registry.nodes()] == ["n2"] and admin.registry.active_id is None
    assert admin.call("GET", "/nodes/n1")[0] == 404


def test_the_active_node_is_set_by_place_or_by_id(admin):
    assert admin.call("POST", "/active/1")[2] == {"success": True, "activeIndex": 1, "activeId": "n2"}
    assert admin.registry.active_id == "n2" and admin.store.held.active_id == "n2"
    assert admin.call("PUT", "/active", {"id": "n1"})[2] == {"success": True, "activeIndex": 0, "activeId": "n1"}
    assert admin.registry.active_id == "n1"


def test_routes_that_take_an_id_take_a_unique_name_too(admin):
    assert admin.call("GET", "/nodes/node2")[2]["node"]["id"] == "n2"
    code, _, answer = admin.call("PATCH", "/nodes/node2", {"name": "renamed", "weight": 3})
    assert code == 200 and (answer["node"]["id"], answer["node"]["name"]) == ("n2", "renamed")
    assert admin.call("GET", "/nodes/node2")[0] == 404  # the old name is gone
    assert admin.call("POST", "/nodes/renamed/drain")[2]["node"]["draining"] is True
    assert admin.call("PUT", "/active", {"id": "renamed"})[2] == {"success": True, "activeIndex": 1, "activeId": "n2"}
    assert admin.call("DELETE", "/nodes/node1")[0] == 200
    assert [node.id for node in admin.registry.nodes()] == ["n2"]


def test_an_id_wins_over_a_name_and_a_shared_name_is_409():
    named = [attrs.evolve(node(index), name=name) for index, name in ((2, "twin"), (3, "twin"), (4, "n1"))]
    admin = build([node(1), *named])
    assert admin.call("GET", "/nodes/n1")[2]["node"]["name"] == "node1"  # n1 is node1's id, and node4's name
    before = admin.fleet()
    for method, path, body in [("GET", "/nodes/twin", None), ("PATCH", "/nodes/twin", {"weight": 2}),
                               ("DELETE", "/nodes/twin", None), ("POST", "/nodes/twin/drain", None),
                               ("PUT", "/active", {"id": "twin"})]:
        code, _, answer = admin.call(method, path, body)
        assert (code, answer) == (409, {"error": "2 nodes are named 'twin': name the node by its id",
                                        "code": "ambiguous_node"}), path
    assert admin.fleet() == before
    assert admin.call("GET", "/nodes/n3")[2]["node"]["name"] == "twin"  # by id, each twin is reachable


def test_the_policy_is_read_and_set(admin):
    assert admin.call("GET", "/policy")[2] == {"policy": "active-first"}
    assert admin.call("PUT", "/policy", {"policy": "least-inflight"})[2] == {"success": True,
                                                                             "policy": "least-inflight"}
    assert admin.balancer.policy == "least-inflight" and admin.store.held.policy == "least-inflight"
    assert admin.call("GET", "/policy")[2] == {"policy": "least-inflight"}


@pytest.mark.parametrize("status, state", [(200, "up"), (503, "down")])
def test_a_forced_health_check_probes_every_node_before_answering(admin, status, state):
    admin.nodes.status = status
    code, _, answer = admin.call("POST", "/health-check")
    assert code == 200 and answer["success"] is True
    assert [(n["id"], n["state"]) for n in answer["nodes"]] == [("n1", state), ("n2", state)]


def test_an_unexpected_failure_is_a_500_without_details():
    class BrokenHealth:
        def check_now(self):
            return fail(RuntimeError("a bug with a secret in it"))

    admin = build([node(1)], health=BrokenHealth())
    code, headers, answer = admin.call("POST", "/health-check")
    assert (code, answer["code"]) == (500, "internal_error")
    assert "secret" not in answer["error"] and headers.getRawHeaders("content-type") == ["application/json"]


# -- refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "method, path, body, raw, status, code, fragment",
    [
        ("POST", "/nodes", None, b"{nope", 400, "malformed_json", "not valid JSON"),
        ("POST", "/nodes", None, b"\xff\xfe", 400, "malformed_json", "not valid JSON"),
        ("POST", "/nodes", [1, 2], None, 400, "invalid_body", "must be a JSON object"),
        ("POST", "/nodes", {"baseURL": "http://10.9.9.9:1"}, None, 400, "invalid_field", "name: missing"),
        ("POST", "/nodes", {"name": "x"}, None, 400, "invalid_field", "baseURL: missing"),
        ("POST", "/nodes", {"name": "x", "baseURL": "ftp://h"}, None, 400, "invalid_field", "baseURL:"),
        ("POST", "/nodes", {"name": "x", "baseURL": "http://h:1", "colour": 1}, None, 400, "invalid_field",
         "colour: unknown"),
        ("POST", "/nodes", {"name": "x", "baseURL": "http://h:1", "draining": True}, None, 400, "invalid_field",
         "draining: unknown"),
        ("POST", "/nodes", None, b"[" + b"1," * 40000 + b"1]", 413, "body_too_large", "exceeds"),
        ("POST", "/nodes", {"name": "again", "baseURL": "http://10.0.0.1:8000/"}, None, 409, "duplicate_node",
         "baseURL: base URL http://10.0.0.1:8000 is already used by node node1"),
        ("GET", "/nodes/nosuch", None, None, 404, "node_not_found", "Node not found"),
        ("PATCH", "/nodes/nosuch", {"name": "x"}, None, 404, "node_not_found", "Node not found"),
        ("DELETE", "/nodes/nosuch", None, None, 404, "node_not_found", "Node not found"),
        ("POST", "/nodes/nosuch/drain", None, None, 404, "node_not_found", "Node not found"),
        ("PATCH", "/nodes/n1", {"baseURL": "http://10.0.0.9:1"}, None, 400, "invalid_field", "baseURL: unknown"),
        ("PATCH", "/nodes/n1", {"weight": 0}, None, 400, "invalid_field", "weight:"),
        ("PATCH", "/nodes/n1", {"draining": "yes"}, None, 400, "invalid_field", "draining:"),
        ("POST", "/active/01", None, None, 400, "invalid_field", "index:"),
        ("POST", "/active/-1", None, None, 400, "invalid_field", "index:"),
        ("POST", "/active/2", None, None, 400, "invalid_field", "index: there are 2 nodes"),
        ("PUT", "/active", {"id": "nosuch"}, None, 404, "node_not_found", "Node not found"),
        ("PUT", "/active", {"id": 1}, None, 400, "invalid_field", "id:"),
        ("PUT", "/active", {"id": "n1", "also": 2}, None, 400, "invalid_field", "id:"),
        ("PUT", "/policy", {"policy": "fastest"}, None, 400, "invalid_field", "policy:"),
        ("GET", "/nosuch", None, None, 404, "not_found", "no such admin route"),
        ("GET", "/nodes/n1/drain/more", None, None, 404, "not_found", "no such admin route"),
    ],
)
def test_refusals_name_the_problem_and_change_nothing(admin, method, path, body, raw, status, code, fragment):
    before = admin.fleet()
    answered, headers, answer = admin.call(method, path, body, raw=raw)
    assert (answered, answer["code"]) == (status, code)
    assert fragment in answer["error"]
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert admin.fleet() == before


WRITES = [
    ("POST", "/nodes", {"name": "x", "baseURL": "http://10.0.0.9:8000"}),
    ("PATCH", "/nodes/n1", {"name": "x"}),
    ("DELETE", "/nodes/n1", None),
    ("POST", "/nodes/n1/drain", None),
    ("POST", "/active/1", None),
    ("PUT", "/active", {"id": "n2"}),
    ("PUT", "/policy", {"policy": "round-robin"}),
]


@pytest.mark.parametrize("method, path, body", WRITES)
def test_a_change_the_store_does_not_take_is_503_and_not_applied(admin, method, path, body):
    admin.store.refusing = True
    before = admin.fleet()
    code, _, answer = admin.call(method, path, body)
    assert (code, answer["code"]) == (503, "state_store_unavailable")
    assert "etcd is unreachable" in answer["error"]
    assert admin.fleet() == before


@pytest.mark.parametrize("method, path, body", WRITES)
def test_a_change_that_keeps_losing_races_is_409_and_not_applied(admin, method, path, body):
    admin.store.racing = True
    before = admin.fleet()
    code, _, answer = admin.call(method, path, body)
    assert (code, answer["code"]) == (409, "conflict")
    assert admin.fleet() == before and admin.store.commits > 2  # worked out again before giving up


@pytest.mark.parametrize("method, path, allowed", [("DELETE", "/status", "GET"), ("PUT", "/nodes", "POST"),
                                                   ("POST", "/policy", "PUT"), ("GET", "/active", "PUT")])
def test_a_wrong_method_is_405_with_allow(admin, method, path, allowed):
    code, headers, answer = admin.call(method, path)
    assert (code, answer["code"]) == (405, "method_not_allowed")
    assert allowed in headers.getRawHeaders("allow")[0]
    assert headers.getRawHeaders("content-type") == ["application/json"]


# -- the OpenAPI document --------------------------------------------------------------------

def test_the_openapi_document_is_served_without_a_token(admin):
    code, headers, document = admin.call("GET", "/openapi.json", headers={})
    assert code == 200 and headers.getRawHeaders("content-type") == ["application/json"]
    assert document["openapi"].startswith("3.1") and document["servers"] == [{"url": "/_admin"}]
    with open(OPENAPI_PATH, encoding="utf-8") as source:
        assert document == json.load(source)


def test_the_openapi_document_lists_exactly_the_routes_the_app_serves(admin):
    document = admin.call("GET", "/openapi.json", headers={})[2]
    documented = {(re.sub(r"\{\w+\}", "<>", path), method.upper())
                  for path, operations in document["paths"].items()
                  for method in operations if method != "parameters"}
    served = {(re.sub(r"<\w+>", "<>", rule.rule), method)
              for rule in AdminAPI.app.url_map.iter_rules()
              for method in rule.methods if method != "HEAD" and rule.rule != "/openapi.json"}
    assert documented == served
