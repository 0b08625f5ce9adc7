"""SIGHUP reload: the environment file, the node plan, what applies live and what waits."""

import attrs
import pytest
from twisted.internet.task import Clock

from blyanproxy.config import ConfigError, Settings
from blyanproxy.core import fleetedit
from blyanproxy.core.nodes import Node, NodeRegistry
from blyanproxy.fleet.balancer import Balancer
from blyanproxy.fleet.keeper import FleetKeeper
from blyanproxy.logs import set_log_level
from blyanproxy.serve.envfile import load_settings, parse_env_file
from blyanproxy.serve.reload import Reloader, plan_nodes, restart_needed
from blyanproxy.store.jsonfile import JsonFileStore
from blyanproxy.tap import node_from_spec


def test_env_file_syntax():
    text = (
        "# a comment\n; another\n\n"
        "NODE_0=gpu-a|http://10.0.0.1:8000|tags=a,b\n"
        "  LOG_LEVEL = DEBUG  \n"
        "ADMIN_TOKEN='0123456789abcdef0123'\n"
        'STATE_FILE="/var/lib/blyan-proxy/state.json"\n'
        "EMPTY=\n"
    )
    assert parse_env_file(text) == {
        "NODE_0": "gpu-a|http://10.0.0.1:8000|tags=a,b",
        "LOG_LEVEL": "DEBUG",
        "ADMIN_TOKEN": "0123456789abcdef0123",
        "STATE_FILE": "/var/lib/blyan-proxy/state.json",
        "EMPTY": "",
    }


@pytest.mark.parametrize("line", ["no equals sign", "1BAD=x", "=x", "A B=c"])
def test_a_bad_line_is_named_by_number_never_quoted(line):
    with pytest.raises(ConfigError) as caught:
        parse_env_file(f"GOOD=1\n{line}\n", "/etc/proxy.env")
    assert str(caught.value) == "/etc/proxy.env line 2: expected NAME=value"


def test_the_file_overrides_the_environment_and_options_override_the_file(tmp_path):
    env_file = tmp_path / "proxy.env"
    env_file.write_text("SELECTION_POLICY=round-robin\nLOG_LEVEL=DEBUG\nNODE_1=b|http://10.0.0.2:8000\n"
                        "ENV_FILE=/elsewhere\n")
    environ = {"ENV_FILE": str(env_file), "SELECTION_POLICY": "least-latency", "LOG_LEVEL": "ERROR",
               "NODE_0": "a|http://10.0.0.1:8000"}
    settings = load_settings(environ, {"log-level": "WARN"})
    assert settings.selection_policy == "round-robin"
    assert settings.log_level == "WARN"
    assert [n.name for n in settings.nodes] == ["a", "b"]
    assert settings.env_file == str(env_file)  # ENV_FILE inside the file means nothing


def test_a_missing_env_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"ENV_FILE: .*missing.env cannot be read"):
        load_settings({}, {"env-file": str(tmp_path / "missing.env")})


def node(index, declared=True, **kwargs):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000",
                declared_by=f"NODE_{index}" if declared else None, **kwargs)


def test_an_unchanged_declaration_plans_nothing():
    current = [node(0), node(1)]
    assert not plan_nodes(current, (), [attrs.evolve(n, id="new") for n in current])


def test_plan_adds_updates_and_removes_declared_nodes_only():
    current = [node(0), node(1), node(2, declared=False), node(3)]
    declared = [
        attrs.evolve(node(0), id="x0", weight=5, tags=("a100",)),  # same URL: updated in place
        attrs.evolve(node(3), id="x3", base_url="http://10.0.0.33:8000"),  # NODE_3 moved
        node(4),  # new
        node(5),  # new, but removed at run time
    ]
    plan = plan_nodes(current, ["http://10.0.0.5:8000"], declared)
    assert [n.name for n in plan.add] == ["node4"]
    assert dict(plan.update) == {"n0": {"weight": 5, "tags": ("a100",)},
                                 "n3": {"base_url": "http://10.0.0.33:8000"}}
    assert [n.id for n in plan.remove] == ["n1"]  # node2 was added at run time: it stays


def test_a_declaration_naming_a_runtime_node_adopts_it():
    plan = plan_nodes([node(2, declared=False)], (), [attrs.evolve(node(2), id="fresh", name="gpu")])
    assert plan.add == () and plan.remove == ()
    assert dict(plan.update) == {"n2": {"name": "gpu", "declared_by": "NODE_2"}}


def test_restart_needed_names_variables_never_values():
    old = Settings(admin_token="a" * 16)
    new = attrs.evolve(old, admin_token="b" * 16, max_attempts=2, listen="tcp:1", log_level="DEBUG",
                       selection_policy="round-robin", nodes=())
    assert restart_needed(old, new) == ["LISTEN", "ADMIN_TOKEN", "MAX_ATTEMPTS"]


class Fleet:
    """A registry, balancer and fleet keeper on a state file, and a Reloader fed from ``self.files``."""

    def __init__(self, tmp_path, text):
        self.clock = Clock()
        self.env_file = tmp_path / "proxy.env"
        self.env_file.write_text(text)
        settings = self.load()
        self.registry = NodeRegistry()
        self.balancer = Balancer(self.registry, self.clock, settings.selection_policy)
        self.keeper = FleetKeeper(self.registry, self.balancer, JsonFileStore(str(tmp_path / "s.json"), self.clock))
        self.keeper.restore([node_from_spec(s, 0.0) for s in settings.nodes])
        self.reloader = Reloader(settings, self.load, self.registry, self.keeper,
                                 lambda spec: node_from_spec(spec, self.clock.seconds()))

    def load(self):
        return load_settings({"ENV_FILE": str(self.env_file)}, {})

    def reload(self, text):
        self.env_file.write_text(text)
        return self.reloader.reload()

    def names(self):
        return [n.name for n in self.registry.nodes()]


A, B, C = "a|http://10.0.0.1:8000", "b|http://10.0.0.2:8000", "c|http://10.0.0.3:8000"


@pytest.fixture
def log_level_restored():
    yield
    set_log_level("INFO")


def test_reload_applies_nodes_policy_and_log_level(tmp_path, log_level_restored):
    fleet = Fleet(tmp_path, f"NODE_0={A}\nNODE_1={B}\n")
    stats = fleet.registry.stats(fleet.registry.nodes()[0].id)
    stats.in_flight = 1  # a request under way on node a
    assert fleet.reload(f"NODE_0={A}|weight=3\nNODE_2={C}\nSELECTION_POLICY=round-robin\nLOG_LEVEL=DEBUG\n")
    assert fleet.names() == ["a", "c"]
    assert fleet.registry.nodes()[0].weight == 3
    assert fleet.registry.stats(fleet.registry.nodes()[0].id) is stats  # live figures kept
    assert fleet.balancer.policy == "round-robin"
    assert fleet.reloader.settings.log_level == "DEBUG"
    assert [n.name for n in fleet.keeper.snapshot().nodes] == ["a", "c"]
    # A declaration that went away is not a runtime removal: declaring it again brings it back.
    assert fleet.keeper.snapshot().removed == ()
    assert fleet.reload(f"NODE_0={A}\nNODE_1={B}\nNODE_2={C}\n")
    assert fleet.names() == ["a", "c", "b"]


def test_a_bad_file_changes_nothing(tmp_path):
    fleet = Fleet(tmp_path, f"NODE_0={A}\n")
    before = fleet.keeper.snapshot()
    for text in ("NODE_0=not a node\n", "HEALTH_INTERVAL_MS=soon\n", "garbage\n"):
        assert not fleet.reload(text)
        assert fleet.keeper.snapshot() == before
        assert fleet.balancer.policy == "active-first"
    fleet.env_file.unlink()
    assert not fleet.reloader.reload()


def test_a_runtime_removal_and_a_runtime_policy_survive_a_reload(tmp_path):
    fleet = Fleet(tmp_path, f"NODE_0={A}\nNODE_1={B}\n")
    fleet.keeper.edit(fleetedit.remove_node(fleet.registry.nodes()[1].id))  # as the admin API does
    fleet.keeper.edit(fleetedit.set_policy("least-inflight"))
    assert fleet.reload(f"NODE_0={A}\nNODE_1={B}\nSELECTION_POLICY=round-robin\n")
    assert fleet.names() == ["a"]
    assert fleet.balancer.policy == "least-inflight"
