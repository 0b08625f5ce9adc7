"""HealthMonitor on a Clock: probing, no overlapping runs, joined forced checks, resilience."""

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from blyanproxy.core.healthstate import DOWN, UP, HealthRules
from blyanproxy.core.nodes import Node, NodeRegistry
from blyanproxy.fleet.health import HealthMonitor


@attrs.define
class FakeResponse:
    code: int
    body: bytes = b'{"status": "ok"}'
    length: object = None

    def deliverBody(self, protocol):
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeHTTP:
    """Answers are given by the test: ``answer(url, status)``; unanswered calls stay pending."""

    def __init__(self):
        self.calls = []
        self.crash_for = set()

    def get(self, url, allow_redirects):
        if any(url.startswith(prefix) for prefix in self.crash_for):
            raise RuntimeError("bug in probing")
        d = Deferred()
        self.calls.append((url, d))
        return d

    def answer_all(self, status):
        calls, self.calls = self.calls, []
        for _, d in calls:
            d.callback(FakeResponse(status))


def node(index, **kwargs):
    """A node of a declared engine and models: no detection, no model list read (see test_engine_probes)."""
    kwargs = {"engine": "blyan", "models": ("m",), **kwargs}
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **kwargs)


def monitor(nodes=2, paths=("/health",), interval=5.0, timeout=3.0):
    clock, http, registry = Clock(), FakeHTTP(), NodeRegistry()
    for index in range(nodes):
        registry.add(node(index))
    health = HealthMonitor(registry, http, clock, interval, timeout, paths, frozenset(range(200, 300)),
                           HealthRules(rise=2, fall=3))
    return clock, http, registry, health


def states(registry):
    return [registry.stats(n.id).health.state for n in registry.nodes()]


def test_every_node_is_probed_at_start_and_each_interval():
    clock, http, registry, health = monitor()
    health.startService()
    assert sorted(url for url, _ in http.calls) == ["http://10.0.0.0:8000/health", "http://10.0.0.1:8000/health"]
    http.answer_all(200)
    assert states(registry) == [UP, UP]
    clock.advance(5)
    assert len(http.calls) == 2
    http.answer_all(503)
    assert states(registry) == [UP, UP]  # one failure does not take a node down
    for _ in range(2):
        clock.advance(5)
        http.answer_all(503)
    assert states(registry) == [DOWN, DOWN]
    health.stopService()


def test_runs_never_overlap_and_a_forced_check_joins_the_run():
    clock, http, registry, health = monitor(timeout=20.0)
    health.startService()
    clock.advance(12)  # two intervals later the first run is still waiting for answers
    assert len(http.calls) == 2
    joined = health.check_now()
    assert len(http.calls) == 2 and not joined.called
    http.answer_all(200)
    assert joined.called
    clock.advance(5)
    assert len(http.calls) == 2  # the next run started on schedule
    http.answer_all(200)
    health.stopService()


def test_paths_are_tried_in_order_until_one_passes():
    clock, http, registry, health = monitor(nodes=1, paths=("/health", "/pol/status"))
    health.startService()
    (url, d), = http.calls
    assert url.endswith("/health")
    http.calls.clear()
    d.callback(FakeResponse(404))
    (url, d), = http.calls
    assert url.endswith("/pol/status")
    d.callback(FakeResponse(200))
    assert states(registry) == [UP]
    health.stopService()


def test_a_crashing_probe_marks_the_node_failed_and_the_loop_goes_on():
    clock, http, registry, health = monitor()
    http.crash_for.add("http://10.0.0.0")
    health.startService()
    http.answer_all(200)
    assert states(registry) == [DOWN, UP]
    assert "RuntimeError" in registry.stats("n0").health.last_error
    clock.advance(5)
    assert len(http.calls) == 1  # still probing the healthy node
    http.answer_all(200)
    health.stopService()


def test_a_node_added_at_run_time_is_probed_at_once():
    clock, http, registry, health = monitor(nodes=0)
    health.startService()
    registry.add(node(7))
    assert [url for url, _ in http.calls] == ["http://10.0.0.7:8000/health"]
    http.answer_all(200)
    assert states(registry) == [UP]
    health.stopService()


def test_a_node_health_path_overrides_the_setting():
    clock, http, registry, health = monitor(nodes=0)
    registry.add(node(3, metadata={"healthPath": "/ready"}))
    health.check_now()
    assert [url for url, _ in http.calls] == ["http://10.0.0.3:8000/ready"]
    http.answer_all(200)


class StallingResponse:
    """Headers arrived; the body never ends."""

    code = 200
    length = None

    def deliverBody(self, protocol):
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)
        protocol.dataReceived(b'{"status": ')


def test_a_node_that_stalls_its_answer_fails_the_probe_and_the_loop_goes_on():
    clock, http, registry, health = monitor(nodes=1)
    health.startService()
    (_, d), = http.calls
    http.calls.clear()
    stalled = StallingResponse()
    d.callback(stalled)
    clock.advance(3.1)  # the probe timeout covers the body too
    assert stalled.transport.producerState == "stopped"  # the connection is closed
    assert registry.stats("n0").health.state == DOWN
    assert "no answer within 3 s" in registry.stats("n0").health.last_error
    clock.advance(5)
    assert len(http.calls) == 1  # the next run started
    http.answer_all(200)
    health.stopService()


def test_an_answer_for_a_node_removed_and_added_again_is_dropped():
    clock, http, registry, health = monitor(nodes=1)
    health.check_now()
    (_, d), = http.calls
    http.calls.clear()
    old = registry.remove("n0")
    registry.add(old)
    d.callback(FakeResponse(503))
    assert registry.stats("n0").health.state == "unknown"


def test_a_node_moved_to_another_url_is_probed_at_once():
    clock, http, registry, health = monitor(nodes=1)
    health.startService()
    http.answer_all(200)
    registry.update("n0", base_url="http://10.0.0.99:8000")
    assert [url for url, _ in http.calls] == ["http://10.0.0.99:8000/health"]
    http.answer_all(200)
    health.stopService()


def test_a_node_going_down_tells_whoever_watches_it():
    clock, http, registry, health = monitor()
    told = []
    registry.stats("n0").watch_out(told.append)
    health.startService()
    http.answer_all(200)
    for _ in range(3):
        clock.advance(5)
        assert told == []
        http.answer_all(503)
    assert states(registry) == [DOWN, DOWN] and told == ["down"]
    clock.advance(5)
    http.answer_all(503)
    assert told == ["down"]  # already down: not told again
    health.stopService()
