"""The public read-only endpoints rendered with DummyRequest: /health, /_status, / (liveness), /workloads."""

import json
import types

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.admin import HealthView, LivenessView, StatusView, WorkloadsView
from blyanproxy.core import HealthRules, NodeRegistry, after_probe
from blyanproxy.discovery import KeyedBalancer, WorkloadDirectory
from blyanproxy.discovery.workloads import Workload
from blyanproxy.discovery.workloadsapi import KeyRefused, WorkloadsUnavailable
from blyanproxy.fleet import Balancer

from .fleet import node, registry_of


def render(resource, method=b"GET", **headers):
    """``(request, body)``: the body returned, or written so far when the answer is not done yet."""
    request = DummyRequest([b""])
    request.method = method
    request.isSecure = lambda: False  # what twisted.web's Request has and DummyRequest lacks
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    body = resource.render(request)
    if body is NOT_DONE_YET:
        body = b"".join(request.written)
    return request, body


def header(request, name):
    return request.responseHeaders.getRawHeaders(name)


def assert_json_error(request, body, status, code):
    assert request.responseCode == status and json.loads(body)["code"] == code
    assert header(request, b"content-type") == [b"application/json"]


# -- /health -----------------------------------------------------------------------------

def test_health_is_200_while_a_node_can_take_requests_and_503_when_none_can():
    clock = Clock()
    registry = registry_of(node(1), node(2, draining=True))
    view = HealthView(registry, clock)
    clock.advance(12.3456)
    request, body = render(view)
    assert request.responseCode == 200
    assert json.loads(body) == {"status": "healthy", "nodes": 2, "healthyNodes": 1, "uptime": 12.346}
    assert header(request, b"content-type") == [b"application/json"]
    assert header(request, b"cache-control") == [b"no-store"]
    stats = registry.stats("n1")
    stats.health = after_probe(stats.health, False, clock.seconds(), HealthRules())
    request, body = render(view)
    assert request.responseCode == 503
    assert json.loads(body) == {"status": "degraded", "nodes": 2, "healthyNodes": 0, "uptime": 12.346}


def test_health_of_an_empty_fleet_is_degraded():
    request, body = render(HealthView(NodeRegistry(), Clock()))
    assert request.responseCode == 503 and json.loads(body)["status"] == "degraded"


# -- /_status ----------------------------------------------------------------------------

def test_status_counts_nodes_and_shows_the_policy_and_request_counters():
    clock = Clock()
    registry = registry_of(node(1), node(2, draining=True), node(3))
    balancer = Balancer(registry, clock, "round-robin")
    counters = types.SimpleNamespace(requests=12, failures=3)
    view = StatusView(registry, balancer, counters, clock)
    request, body = render(view)
    assert request.responseCode == 200 and header(request, b"cache-control") == [b"no-store"]
    assert json.loads(body) == {"healthy": 2, "total": 3, "policy": "round-robin",
                                "metrics": {"requests": 12, "failures": 3}}
    balancer.policy = "least-latency"
    counters.requests = 13
    assert json.loads(render(view)[1])["policy"] == "least-latency"
    assert json.loads(render(view)[1])["metrics"]["requests"] == 13


# -- / -----------------------------------------------------------------------------------

def test_liveness_answers_the_time_in_utc():
    clock = Clock()
    clock.advance(86400 + 3661.7)
    request, body = render(LivenessView(clock))
    assert request.responseCode == 200
    assert json.loads(body) == {"status": "healthy", "time": "1970-01-02T01:01:01Z"}
    assert LivenessView.only_methods == (b"GET", b"HEAD")


class Client:
    """A workloads API client the test answers by hand."""

    def __init__(self):
        self.pending = []

    def fetch(self, key):
        answer = defer.Deferred()
        self.pending.append((key, answer))
        return answer

    def close(self):
        return defer.succeed(None)


# -- methods -------------------------------------------------------------------------------

def views():
    clock = Clock()
    registry = registry_of(node(1))
    return [
        HealthView(registry, clock),
        StatusView(registry, Balancer(registry, clock), types.SimpleNamespace(requests=0, failures=0), clock),
        LivenessView(clock),
        WorkloadsView(WorkloadDirectory(Client(), clock, KeyedBalancer(clock))),
    ]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])
def test_only_get_and_head_are_answered(index, method):
    request, body = render(views()[index], method, X_C3_API_KEY=b"key-1")
    assert_json_error(request, body, 405, "method_not_allowed")
    assert header(request, b"allow") == [b"GET, HEAD"] and request.finished


@pytest.mark.parametrize("index", range(3))
def test_head_is_answered_like_get(index):
    view = views()[index]
    head, _ = render(view, b"HEAD")
    get, _ = render(view, b"GET")
    assert head.responseCode == get.responseCode == 200
    assert header(head, b"content-type") == header(get, b"content-type") == [b"application/json"]


# -- /workloads ------------------------------------------------------------------------------

@pytest.fixture
def client():
    return Client()


@pytest.fixture
def view(client):
    clock = Clock()
    directory = WorkloadDirectory(client, clock, KeyedBalancer(clock))
    directory.startService()
    yield WorkloadsView(directory)
    directory.stopService()


LISTED = (
    Workload(workload="wl-1", node="10.0.0.1:8000", running=True, status="running", type="vllm",
             created=5, expires=99, tags=("a100",)),
    Workload(workload="wl-2", node="10.0.0.2:8000", running=False, status="stopped"),
)


@pytest.mark.parametrize("headers", [{"X_C3_API_KEY": b"key-1"}, {"Authorization": b"Bearer key-1"}])
def test_the_callers_workloads_are_listed_as_the_api_gave_them_running_or_not(view, client, headers):
    request, body = render(view, **headers)
    assert body == b"" and not request.finished  # waiting for the API
    [(key, answer)] = client.pending
    assert key == b"key-1"
    answer.callback(LISTED)
    assert request.finished and request.responseCode in (None, 200)
    assert json.loads(b"".join(request.written)) == [
        {"created": 5, "expires": 99, "node": "10.0.0.1:8000", "running": True, "status": "running",
         "type": "vllm", "workload": "wl-1", "tags": ["a100"]},
        {"created": None, "expires": None, "node": "10.0.0.2:8000", "running": False, "status": "stopped",
         "type": "", "workload": "wl-2", "tags": []},
    ]
    assert header(request, b"content-type") == [b"application/json"]
    assert header(request, b"cache-control") == [b"no-store"]


def test_a_cached_list_is_answered_without_asking_the_api_again(view, client):
    render(view, X_C3_API_KEY=b"key-1")
    client.pending.pop()[1].callback(LISTED)
    request, body = render(view, X_C3_API_KEY=b"key-1")
    assert request.finished and [item["workload"] for item in json.loads(body)] == ["wl-1", "wl-2"]
    assert client.pending == []


@pytest.mark.parametrize("headers, code", [({}, "missing_api_key"), ({"X_C3_API_KEY": b"bad key"}, "invalid_api_key"),
                                           ({"Authorization": b"Basic a2V5"}, "missing_api_key")])
def test_a_request_without_a_usable_key_is_401_without_asking_the_api(view, client, headers, code):
    request, body = render(view, **headers)
    assert_json_error(request, body, 401, code)
    assert request.finished and client.pending == []


@pytest.mark.parametrize("failure, status, code", [(KeyRefused("401"), 401, "api_key_rejected"),
                                                    (WorkloadsUnavailable("down"), 502, "workloads_unavailable")])
def test_an_api_failure_is_answered_as_a_json_error(view, client, failure, status, code):
    request, _ = render(view, X_C3_API_KEY=b"key-1")
    client.pending.pop()[1].errback(failure)
    assert_json_error(request, b"".join(request.written), status, code)
    assert request.finished


def test_nothing_is_written_to_a_client_that_left_before_the_answer(view, client):
    request, _ = render(view, X_C3_API_KEY=b"key-1")
    request.processingFailed(Failure(ConnectionDone()))
    client.pending.pop()[1].callback(LISTED)
    assert request.written == [] and not request.finished
