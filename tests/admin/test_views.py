"""The JSON views of the fleet: one node with its live figures, the list, the active place, the usable count."""

from blyanproxy.admin.views import active_index, node_view, nodes_view, usable_count
from blyanproxy.core import HealthRules, NodeRegistry, after_probe, after_traffic_failure

from .fleet import node, registry_of

RULES = HealthRules(cooldown=10.0)
NOW = 1000.0




def probed(registry, node_id, passed, now=NOW, error=None):
    stats = registry.stats(node_id)
    stats.health = after_probe(stats.health, passed, now, RULES, error)


def ejected(registry, node_id, now=NOW):
    stats = registry.stats(node_id)
    stats.health = after_traffic_failure(stats.health, "refused", now, RULES)


def test_a_node_view_shows_the_engine_load_figures_and_their_age():
    from blyanproxy.core import LoadFigures

    registry = registry_of(node(1))
    stats = registry.stats("n1")
    stats.load, stats.in_flight = LoadFigures(waiting=2.0, running=5.0, kv_use=None, at=NOW - 1.5), 3
    assert node_view(registry.get("n1"), stats, NOW)["load"] == {
        "waiting": 2.0, "running": 5.0, "kvCacheUse": None, "ageSeconds": 1.5, "dispatchedSince": 3}


def test_a_node_view_has_the_stored_fields_and_the_live_ones():
    registry = registry_of(node(1, tags=("a100",), metadata={"gpu": "A100"}, weight=2, added_at=5.0,
                                declared_by="NODE_1"))
    stats = registry.stats("n1")
    stats.requests, stats.failures, stats.in_flight, stats.consecutive_failures = 9, 2, 1, 1
    stats.observe_latency(120.0)
    probed(registry, "n1", True, now=990.0)
    assert node_view(registry.get("n1"), stats, NOW) == {
        "id": "n1", "name": "node1", "baseURL": "http://10.0.0.1:8000", "tags": ["a100"],
        "metadata": {"gpu": "A100"}, "weight": 2, "draining": False, "tlsVerify": True, "addedAt": 5000,
        "declaredBy": "NODE_1",
        "healthy": True, "usable": True, "state": "up", "ejected": False, "lastCheck": 990000, "lastError": None,
        "responseTime": 120.0, "consecutiveFailures": 1, "inFlight": 1, "requests": 9, "failures": 2,
        "ejectedUntil": None, "ejectReason": None, "ejections": 0,
        "engine": "auto", "models": [], "detectedEngine": None, "servedModels": None, "maxInflight": None, "load": None,
    }


def test_a_node_never_probed_is_usable_but_not_called_healthy():
    registry = registry_of(node(1))
    view = node_view(registry.get("n1"), registry.stats("n1"), NOW)
    assert (view["state"], view["healthy"], view["usable"], view["lastCheck"]) == ("unknown", False, True, None)


def test_a_failing_probe_shows_down_with_its_error():
    registry = registry_of(node(1))
    probed(registry, "n1", False, error="/health: status 503")
    view = node_view(registry.get("n1"), registry.stats("n1"), NOW)
    assert (view["state"], view["healthy"], view["usable"]) == ("down", False, False)
    assert view["lastError"] == "/health: status 503"


def test_a_draining_node_is_healthy_but_not_usable():
    registry = registry_of(node(1, draining=True))
    probed(registry, "n1", True)
    view = node_view(registry.get("n1"), registry.stats("n1"), NOW)
    assert (view["draining"], view["healthy"], view["usable"]) == (True, True, False)


def test_an_ejection_shows_until_when_and_why_while_it_lasts():
    registry = registry_of(node(1))
    probed(registry, "n1", True)
    ejected(registry, "n1")
    during = node_view(registry.get("n1"), registry.stats("n1"), NOW + 5)
    assert (during["usable"], during["ejectedUntil"], during["ejectReason"], during["ejections"]) == (
        False, (NOW + 10) * 1000, "refused", 1)
    after = node_view(registry.get("n1"), registry.stats("n1"), NOW + 10)
    assert after["ejectedUntil"] is None and after["ejections"] == 1
    assert after["usable"] is False  # after the cooldown, only a passing probe lets it back


def test_an_ejected_node_is_not_called_healthy_though_its_probes_pass():
    """The view shows the ejection as /metrics does (blyan_node_ejected): state ejected, healthy false."""
    registry = registry_of(node(1))
    probed(registry, "n1", True)
    ejected(registry, "n1")
    for when in (NOW + 5, NOW + 10):  # during the cooldown, and after it until a probe passes
        view = node_view(registry.get("n1"), registry.stats("n1"), when)
        assert (view["state"], view["healthy"], view["ejected"], view["usable"]) == ("ejected", False, True, False)
    probed(registry, "n1", True, now=NOW + 11)
    back = node_view(registry.get("n1"), registry.stats("n1"), NOW + 11)
    assert (back["state"], back["healthy"], back["ejected"], back["usable"]) == ("up", True, False, True)


def test_a_node_down_and_ejected_shows_down():
    registry = registry_of(node(1))
    probed(registry, "n1", False)
    registry.stats("n1").health = after_traffic_failure(
        after_probe(registry.stats("n1").health, True, NOW, RULES), "refused", NOW, RULES)
    probed(registry, "n1", False)
    probed(registry, "n1", False)
    probed(registry, "n1", False)
    view = node_view(registry.get("n1"), registry.stats("n1"), NOW + 1)
    assert (view["state"], view["ejected"], view["healthy"]) == ("down", True, False)


def test_times_are_whole_epoch_milliseconds():
    registry = registry_of(node(1, added_at=1767268800.1234))
    probed(registry, "n1", True, now=1767268805.5)
    view = node_view(registry.get("n1"), registry.stats("n1"), 1767268806.0)
    assert (view["addedAt"], view["lastCheck"]) == (1767268800123, 1767268805500)
    assert isinstance(view["addedAt"], int) and isinstance(view["lastCheck"], int)


def test_the_list_follows_registry_order():
    registry = registry_of(node(3), node(1), node(2))
    registry.stats("n1").requests = 4
    views = nodes_view(registry, NOW)
    assert [(v["id"], v["requests"]) for v in views] == [("n3", 0), ("n1", 4), ("n2", 0)]
    assert nodes_view(NodeRegistry(), NOW) == []


def test_the_active_index_is_the_active_nodes_place_or_none():
    registry = registry_of(node(1), node(2), node(3))
    assert active_index(registry) is None
    registry.active_id = "n3"
    assert active_index(registry) == 2
    registry.remove("n1")
    assert active_index(registry) == 1
    registry.active_id = "gone"
    assert active_index(registry) is None


def test_the_usable_count_leaves_out_draining_down_and_ejected_nodes():
    registry = registry_of(node(1), node(2), node(3, draining=True), node(4), node(5))
    probed(registry, "n2", False)
    ejected(registry, "n4")
    assert usable_count(registry, NOW) == 2  # n1 (never probed) and n5
    probed(registry, "n2", True)
    assert usable_count(registry, NOW) == 2  # one pass is not enough to rise from down
    probed(registry, "n2", True)
    assert usable_count(registry, NOW) == 3
    assert usable_count(NodeRegistry(), NOW) == 0


def test_a_node_view_shows_the_engine_detected_and_the_models_served():
    registry = registry_of(node(1), node(2, engine="vllm", models=("a", "b")))
    stats = registry.stats("n1")
    stats.engine, stats.models = "llamacpp", ("smol",)
    assert {k: node_view(registry.get("n1"), stats, NOW)[k] for k in ("engine", "detectedEngine", "servedModels")} \
        == {"engine": "auto", "detectedEngine": "llamacpp", "servedModels": ["smol"]}
    declared = node_view(registry.get("n2"), registry.stats("n2"), NOW)
    assert (declared["engine"], declared["models"], declared["servedModels"]) == ("vllm", ["a", "b"], ["a", "b"])
