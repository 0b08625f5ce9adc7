"""Durable fleet state: atomic JSON file, the merge rule, Blyan's format, damaged files, restarts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from blyanproxy.core.fleetedit import (
    add_node,
    remove_node,
    set_active,
    set_policy,
    update_node,
)
from blyanproxy.core.fleetstate import (
    FleetState,
    StateError,
    StoreUnavailable,
    merge,
)
from blyanproxy.core.nodes import Node, NodeRegistry
from blyanproxy.fleet.balancer import Balancer
from blyanproxy.fleet.keeper import FleetKeeper
from blyanproxy.store.jsonfile import JsonFileStore


def node(index, **kwargs):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **kwargs)


def node_json(index, **fields):
    """A node record as the file holds it."""
    return {"id": f"n{index}", "name": f"node{index}", "baseURL": f"http://10.0.0.{index}:8000", **fields}


@pytest.fixture
def state_errors():
    """The state store's error lines written during the test, formatted."""
    lines = []

    def observe(event):
        if event.get("log_namespace") == "blyanproxy.state" and event["log_level"] == LogLevel.error:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def keeper_on(path, declared=(), policy="active-first"):
    registry = NodeRegistry()
    balancer = Balancer(registry, Clock(), policy)
    keeper = FleetKeeper(registry, balancer, JsonFileStore(str(path), Clock()))
    keeper.restore(list(declared))
    return keeper, registry, balancer


def edited(keeper, change):
    """Apply a change through the keeper (a file store answers at once); the resulting fleet."""
    results = []
    keeper.edit(change).addBoth(results.append)
    assert results and not isinstance(results[0], Failure), results
    return results[0]


def refused(keeper, change):
    """Apply a change the store must refuse; the exception."""
    results = []
    keeper.edit(change).addBoth(results.append)
    assert results and isinstance(results[0], Failure), results
    return results[0].value


def test_save_and_load_round_trip(tmp_path):
    store = JsonFileStore(str(tmp_path / "state.json"), Clock())
    state = FleetState(
        nodes=(node(1, tags=("a100",), metadata={"gpu": "A100"}, weight=3, draining=True), node(2)),
        active_id="n2", policy="round-robin", removed=("http://10.0.0.9:8000",),
    )
    store.save(state)
    assert store.load() == state
    loaded = store.load().nodes[0]
    assert (loaded.metadata, loaded.tags, loaded.weight, loaded.draining) == ({"gpu": "A100"}, ("a100",), 3, True)


def test_first_start_has_no_state(tmp_path):
    assert JsonFileStore(str(tmp_path / "none.json"), Clock()).load() is None


def test_merge_rule():
    saved = FleetState(
        nodes=(node(1, metadata={"gpu": "H100"}, draining=True, declared_by="NODE_1"), node(2)),
        removed=("http://10.0.0.3:8000",),
    )
    declared = [
        Node(id="fresh1", name="renamed", base_url="http://10.0.0.1:8000", weight=5, declared_by="NODE_1"),
        Node(id="fresh3", name="node3", base_url="http://10.0.0.3:8000", declared_by="NODE_3"),
        Node(id="fresh4", name="node4", base_url="http://10.0.0.4:8000", declared_by="NODE_4"),
    ]
    merged = merge(declared, saved)
    by_url = {n.base_url: n for n in merged.nodes}
    kept = by_url["http://10.0.0.1:8000"]
    assert (kept.id, kept.name, kept.weight, kept.metadata, kept.draining) == (
        "n1", "renamed", 5, {"gpu": "H100"}, True,
    )
    assert "http://10.0.0.2:8000" in by_url  # added at run time, restored
    assert "http://10.0.0.3:8000" not in by_url  # removed at run time, stays removed
    assert by_url["http://10.0.0.4:8000"].id == "fresh4"  # new in the environment: appears
    assert merge(declared, None).nodes == tuple(declared)


def test_blyan_state_file_is_converted(tmp_path):
    path = tmp_path / "proxy_state.json"
    path.write_text(json.dumps({
        "nodes": [
            {"id": "a1b2c3d4e5f60708", "name": "primary", "baseURL": "https://gpu1.example.com:8000",
             "healthy": True, "lastCheck": 0, "responseTime": None, "consecutiveFailures": 0, "metadata": {}},
            {"id": "1111111111111111", "name": "backup", "baseURL": "https://gpu2.example.com:8000",
             "metadata": {"gpu": "RTX 6000"}, "addedAt": "2025-08-30T10:00:00Z"},
            {"id": "2222222222222222", "name": "dup", "baseURL": "https://gpu2.example.com:8000"},
        ],
        "activeIndex": 1,
        "savedAt": "2025-08-31T00:00:00Z",
    }))
    state = JsonFileStore(str(path), Clock()).load()
    assert [n.name for n in state.nodes] == ["primary", "backup"]
    assert state.active_id == "1111111111111111"
    assert state.nodes[1].metadata == {"gpu": "RTX 6000"}


@pytest.mark.parametrize(
    "content, problem",
    [(b"{not json", "is not valid JSON"), (b'{"nodes": 3}', "cannot be used"),
     (b'{"version": 1, "nodes": [{"name": "x", "baseURL": "ftp://x"}]}', "cannot be used"),
     (b"\xff\xfe", "is not valid JSON")],
)
def test_a_damaged_file_stops_start_up_and_is_never_overwritten(tmp_path, content, problem):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateError) as caught:
        keeper_on(path, [node(1)])
    assert str(path) in str(caught.value) and problem in str(caught.value)
    assert path.read_bytes() == content


def test_a_damaged_file_falls_back_to_its_backup(tmp_path):
    path = tmp_path / "state.json"
    keeper, registry, _ = keeper_on(path, [node(1)])
    edited(keeper, add_node(node(2)))  # a second save: the first one becomes the backup
    path.write_bytes(b"garbage")
    _, restored, _ = keeper_on(path)
    assert [n.id for n in restored.nodes()] == ["n1"]


def test_runtime_changes_survive_a_restart(tmp_path):
    path = tmp_path / "state.json"
    keeper, registry, balancer = keeper_on(path, [node(1), node(2, declared_by="NODE_2")])
    edited(keeper, add_node(node(3, metadata={"note": "added at run time"})))
    edited(keeper, update_node("n1", draining=True))
    edited(keeper, remove_node("n2"))
    edited(keeper, set_active("n3"))
    edited(keeper, set_policy("least-inflight"))
    _, restored, balancer = keeper_on(path, [node(1), node(2, declared_by="NODE_2")])
    assert [n.id for n in restored.nodes()] == ["n1", "n3"]
    assert restored.get("n1").draining and restored.get("n3").metadata == {"note": "added at run time"}
    assert restored.active_id == "n3"
    assert balancer.policy == "least-inflight"


def test_removing_another_node_never_changes_the_active_one(tmp_path):
    keeper, registry, _ = keeper_on(tmp_path / "s.json", [node(1), node(2), node(3)])
    edited(keeper, set_active("n3"))
    edited(keeper, remove_node("n1"))
    assert registry.active_id == "n3"
    edited(keeper, remove_node("n3"))
    assert registry.active_id is None


def test_an_unwritable_directory_keeps_the_last_good_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    keeper, registry, _ = keeper_on(tmp_path / "state.json", [node(1)])
    before = (tmp_path / "state.json").read_bytes()
    tmp_path.chmod(0o500)
    try:
        assert isinstance(refused(keeper, add_node(node(2))), StoreUnavailable)
    finally:
        tmp_path.chmod(0o700)
    assert (tmp_path / "state.json").read_bytes() == before
    assert [n.id for n in registry.nodes()] == ["n1"]  # a change the store refused is not applied


def test_a_full_disk_keeps_the_last_good_file(tmp_path, monkeypatch):
    keeper, registry, _ = keeper_on(tmp_path / "state.json", [node(1)])
    before = (tmp_path / "state.json").read_bytes()

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert "No space left on device" in str(refused(keeper, add_node(node(2))))
    assert (tmp_path / "state.json").read_bytes() == before
    assert [n.id for n in registry.nodes()] == ["n1"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


SAVER = """
import sys
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from blyanproxy.core.nodes import Node
from blyanproxy.core.fleetstate import FleetState
from blyanproxy.store.jsonfile import JsonFileStore
store = JsonFileStore(sys.argv[1], Clock())
count = 0
while True:
    count += 1
    nodes = tuple(Node(id=f"n{i}", name=f"save{count}", base_url=f"http://10.0.{i // 250}.{i % 250}:8000")
                  for i in range(50))
    store.save(FleetState(nodes=nodes, policy="round-robin"))
    print(count, flush=True)
"""


def test_sigkill_while_saving_leaves_the_last_completed_save(tmp_path):
    path = tmp_path / "state.json"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        last = 0
        while last < 30 and time.monotonic() < deadline:
            last = int(saver.stdout.readline() or 0)
        saver.send_signal(signal.SIGKILL)
        saver.wait(10)
    finally:
        if saver.poll() is None:
            saver.kill()
    printed = [last] + [int(line) for line in saver.stdout.read().split()]
    state = JsonFileStore(str(path), Clock()).load()
    saved = int(state.nodes[0].name[len("save"):])
    assert max(printed) <= saved <= max(printed) + 1  # the last completed save, or the one in flight
    assert len(state.nodes) == 50 and state.policy == "round-robin"


def test_falling_back_to_the_backup_keeps_both_the_damaged_file_and_the_backup(tmp_path):
    path = tmp_path / "state.json"
    keeper, registry, _ = keeper_on(path, [node(1)])
    edited(keeper, add_node(node(2)))
    good_backup = (tmp_path / "state.json.bak").read_bytes()
    path.write_bytes(b"garbage")
    keeper, registry, _ = keeper_on(path)
    edited(keeper, add_node(node(5)))  # more saves after the fallback
    edited(keeper, add_node(node(6)))
    aside = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == b"garbage"
    assert json.loads(good_backup)["nodes"][0]["id"] == "n1"
    assert [n["id"] for n in json.loads(path.read_bytes())["nodes"]] == ["n1", "n5", "n6"]


def test_an_unknown_policy_in_the_file_is_skipped_and_the_default_is_used(tmp_path, state_errors):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "nodes": [node_json(1)], "policy": "fastest"}))
    _, registry, balancer = keeper_on(path, policy="round-robin")
    assert balancer.policy == "round-robin" and [n.id for n in registry.nodes()] == ["n1"]
    assert any("skipped the policy 'fastest'" in line for line in state_errors)


def test_a_declared_node_given_a_new_url_is_the_same_node_moved():
    saved = FleetState(nodes=(node(1, declared_by="NODE_1", metadata={"k": "v"}),))
    moved = Node(id="fresh", name="node1", base_url="http://10.0.0.50:8000", declared_by="NODE_1")
    merged = merge([moved], saved)
    assert [(n.id, n.base_url, n.metadata) for n in merged.nodes] == [("n1", "http://10.0.0.50:8000", {"k": "v"})]


def test_blyan_active_index_points_at_the_same_node_despite_duplicates(tmp_path):
    path = tmp_path / "proxy_state.json"
    path.write_text(json.dumps({
        "nodes": [{"id": "a", "name": "a", "baseURL": "http://10.0.0.1:1"},
                  {"id": "b", "name": "b", "baseURL": "http://10.0.0.1:1"},
                  {"id": "c", "name": "c", "baseURL": "http://10.0.0.3:1"}],
        "activeIndex": 2,
    }))
    state = JsonFileStore(str(path), Clock()).load()
    assert [n.id for n in state.nodes] == ["a", "c"] and state.active_id == "c"


EVIL_NAME = "evil\r\nSet-Cookie: injected=1"


def test_a_node_named_with_a_line_break_is_not_loaded_and_the_file_is_kept_until_the_next_change(
        tmp_path, state_errors):
    path = tmp_path / "state.json"
    document = {"version": 1, "nodes": [node_json(1), node_json(2, name=EVIL_NAME), node_json(3)], "activeId": "n2"}
    path.write_text(json.dumps(document))
    original = path.read_bytes()
    keeper, registry, _ = keeper_on(path, [node(4, declared_by="NODE_4")])
    assert [n.id for n in registry.nodes()] == ["n1", "n3", "n4"] and registry.active_id is None
    [skipped, kept] = state_errors
    assert "node record 2" in skipped and "'evil\\r\\nSet-Cookie: injected=1'" in skipped
    assert "\r" not in skipped and "\n" not in skipped
    assert "kept as it is" in kept
    keeper.flush()  # at exit too: the file stays as it was, the record still there to mend
    assert path.read_bytes() == original
    edited(keeper, set_policy("round-robin"))  # the next change is saved without the record
    assert [n["id"] for n in json.loads(path.read_text())["nodes"]] == ["n1", "n3", "n4"]
    assert (tmp_path / "state.json.bak").read_bytes() == original
    _, restored, balancer = keeper_on(path)
    assert [n.id for n in restored.nodes()] == ["n1", "n3", "n4"] and balancer.policy == "round-robin"


@pytest.mark.parametrize("record, problem", [
    (node_json(2, name="x\x1b[31m"), "name must be"),
    (node_json(2, name="a\u2028b"), "name must be"),
    (node_json(2, name="x" * 200), "name must be"),
    (node_json(2, id="n2\r\nX: 1"), "id must be"),
    (node_json(2, tags=["ok", "bad tag"]), "tags must be"),
    (node_json(2, metadata={"healthPath": "/health\r\nX-Injected: 1"}), "healthPath must be"),
    (node_json(2, metadata={"healthPath": "//evil.example/"}), "healthPath must be"),
    (node_json(2, metadata={"blob": "x" * 20000}), "metadata must be at most"),
    (node_json(2, metadata=[1]), "metadata must be an object"),
    (node_json(2, weight=0), "weight must be"),
    (node_json(2, weight=True), "weight must be"),
    (node_json(2, tlsVerify="no"), "tlsVerify must be true or false"),
    (node_json(2, draining=1), "draining must be true or false"),
    (node_json(2, declaredBy="NODE_2\r\n"), "declaredBy must name a setting"),
    (node_json(2, baseURL="http://user:pw@10.0.0.2:8000"), "baseURL must not carry credentials"),
    ("a string", "a node must be an object"),
])
def test_a_record_breaking_an_admin_input_rule_is_skipped_with_an_error_naming_it(
        tmp_path, state_errors, record, problem):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "nodes": [node_json(1), record]}))
    state = JsonFileStore(str(path), Clock()).load()
    assert [n.id for n in state.nodes] == ["n1"]
    assert "node record 2" in state_errors[0] and problem in state_errors[0]


def test_a_bad_removed_entry_is_skipped_and_the_good_ones_kept(tmp_path, state_errors):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "nodes": [node_json(1)],
                                "removed": ["http://10.0.0.9:8000", "ftp://x", 7]}))
    assert JsonFileStore(str(path), Clock()).load().removed == ("http://10.0.0.9:8000",)
    assert len([line for line in state_errors if "skipped the removed entry" in line]) == 2


def test_a_file_whose_every_node_record_is_bad_is_refused_whole(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "nodes": [node_json(1, name=EVIL_NAME)]}))
    with pytest.raises(StateError, match="no node record is usable"):
        keeper_on(path)


def test_the_backup_and_blyans_format_are_checked_too(tmp_path, state_errors):
    path = tmp_path / "state.json"
    path.write_bytes(b"garbage")
    (tmp_path / "state.json.bak").write_text(json.dumps({"version": 1, "nodes": [node_json(1),
                                                                                  node_json(2, name=EVIL_NAME)]}))
    assert [n.id for n in JsonFileStore(str(path), Clock()).load().nodes] == ["n1"]
    blyan = tmp_path / "proxy_state.json"
    blyan.write_text(json.dumps({"nodes": [node_json(1), node_json(2, name=EVIL_NAME)], "activeIndex": 1}))
    state = JsonFileStore(str(blyan), Clock()).load()
    assert [n.id for n in state.nodes] == ["n1"] and state.active_id is None
    assert len([line for line in state_errors if "evil" in line]) == 2


@pytest.fixture
def umask_022():
    """The usual umask, whatever the test runner had."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path):
    return os.stat(path).st_mode & 0o777


def test_a_symlink_planted_at_the_old_temporary_name_is_not_followed(tmp_path):
    path = tmp_path / "state.json"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f"state.json.tmp-{os.getpid()}").symlink_to(victim)  # where saves used to write
    (tmp_path / "state.json.bak.tmp").symlink_to(victim)
    keeper, _, _ = keeper_on(path, [node(1)])
    edited(keeper, add_node(node(2)))  # a second save: the first becomes the backup
    assert victim.read_text() == "precious"
    assert [n["id"] for n in json.loads(path.read_text())["nodes"]] == ["n1", "n2"]
    assert not path.is_symlink() and not (tmp_path / "state.json.bak").is_symlink()


def test_the_file_and_its_backup_are_0600_under_umask_022(tmp_path, umask_022):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "nodes": [node_json(1)]}))  # as an older version left it
    path.chmod(0o644)
    keeper, _, _ = keeper_on(path)
    edited(keeper, add_node(node(2)))
    assert mode(path) == 0o600 and mode(tmp_path / "state.json.bak") == 0o600
    fresh = tmp_path / "fresh" / "state.json"
    keeper_on(fresh, [node(1)])
    assert mode(fresh) == 0o600


def test_the_backup_is_copied_privately_where_hard_links_fail(tmp_path, umask_022, monkeypatch):
    path = tmp_path / "state.json"
    keeper, _, _ = keeper_on(path, [node(1)])

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    edited(keeper, add_node(node(2)))
    backup = tmp_path / "state.json.bak"
    assert [n["id"] for n in json.loads(backup.read_text())["nodes"]] == ["n1"] and mode(backup) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.bak"]


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_load(tmp_path):
    path = tmp_path / "state.json"
    keeper_on(path, [node(1)])
    for leftover in (".state.json.tmp-3f9a0c2b", ".state.json.bak.tmp-77aa01"):
        (tmp_path / leftover).write_text("half a save")
    (tmp_path / "unrelated.tmp-1").write_text("not ours")
    keeper_on(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.bak", "unrelated.tmp-1"]
