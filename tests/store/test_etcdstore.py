"""EtcdStore against an in-memory etcd JSON gateway on a MemoryReactorClock: first contact, commits,
conflicts, etcd refusing, slow or gone, the watch and its reopening, compaction.

``EtcdStore`` builds its own ``EtcdGateway`` (treq over an ``Agent`` on the
reactor it is given), so the seam used here is the reactor: a
``MemoryReactorClock`` whose connections ``fakeetcd.Network`` completes to a
fake etcd. treq sends request bodies through Twisted's global cooperator,
which is pointed at the same clock for each test.
"""

import json

import attrs
import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from blyanproxy.core import FleetState, Node, NodeRegistry, StoreConflict, StoreUnavailable, node_to_json
from blyanproxy.fleet import Balancer, FleetKeeper
from blyanproxy.store import EtcdAccess, EtcdStore, parse_state_store
from blyanproxy.store.etcdstore import RETRY_DELAY

from .fakeetcd import FakeEtcd, Network

PREFIX = b"/fleet/"
TIMEOUT = 1.0


def node(index, **fields):
    return Node(id=f"n{index}", name=f"node{index}", base_url=f"http://10.0.0.{index}:8000", **fields)


def node_value(each):
    return json.dumps(node_to_json(each)).encode()


@pytest.fixture
def memory(monkeypatch):
    """A MemoryReactorClock, with treq's body producers running on it."""
    clock = MemoryReactorClock()
    cooperator = task.Cooperator(scheduler=lambda work: clock.callLater(0, work))
    monkeypatch.setattr(task, "cooperate", cooperator.cooperate)
    return clock


@pytest.fixture
def etcd():
    return FakeEtcd()


@pytest.fixture
def network(memory, etcd):
    return Network(memory, etcd)


class Proxy:
    """One store as a proxy process uses it: started, its watcher recording every fleet announced."""

    def __init__(self, memory, network, declared=(), access=None):
        self.network = network
        self.announced = []
        self.store = EtcdStore(memory, parse_state_store("etcd://127.0.0.1:2379/fleet"), TIMEOUT, declared,
                               identity="proxy-a:1", access=access)
        self.store.watch(self.announced.append)

    def start(self):
        self.store.startService()
        self.network.settle()
        return self

    def commit(self, wanted):
        """The outcome of one commit (a ``FleetState`` or a ``Failure``) once the network settled."""
        outcomes = []
        self.store.commit(wanted).addBoth(outcomes.append)
        self.network.settle()
        assert outcomes, "the commit has not finished"
        return outcomes[0]

    def stop(self):
        stopped = self.store.stopService()
        self.network.settle()
        return stopped


@pytest.fixture
def proxy(memory, network):
    started = []

    def make(declared=(), access=None):
        made = Proxy(memory, network, declared, access)
        started.append(made)
        return made.start()

    yield make
    for made in started:
        if made.store.running:
            made.stop()


def held_nodes(etcd):
    return sorted(key.decode() for key in etcd.keys if key.startswith(PREFIX + b"nodes/"))


# -- first contact ---------------------------------------------------------------------------

def test_first_contact_merges_the_declared_nodes_into_the_fleet_etcd_holds(etcd, proxy):
    etcd.put(PREFIX + b"nodes/n1", node_value(node(1)))
    etcd.put(PREFIX + b"policy", b"round-robin")
    started = proxy([node(2, declared_by="NODE_0")])
    assert etcd.calls == ["/v3/kv/range", "/v3/kv/txn", "/v3/watch"]
    [announced] = started.announced
    assert [n.id for n in announced.nodes] == ["n1", "n2"] and announced.policy == "round-robin"
    assert held_nodes(etcd) == ["/fleet/nodes/n1", "/fleet/nodes/n2"]
    assert json.loads(etcd.value(PREFIX + b"nodes/n2"))["declaredBy"] == "NODE_0"
    assert started.store.state() == announced and etcd.open_watches == 1


def test_a_store_tells_nothing_at_once_and_flushes_nothing(etcd, proxy):
    started = proxy([node(1)])
    calls = list(etcd.calls)
    assert started.store.load() is None
    started.store.flush(FleetState())
    assert etcd.calls == calls and held_nodes(etcd) == ["/fleet/nodes/n1"]


def test_until_etcd_answers_writes_are_refused_and_contact_is_retried_with_one_warning(memory, network, etcd,
                                                                                       proxy):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        network.down = True
        started = proxy([node(1)])
        refused = started.commit(FleetState(nodes=(node(1), node(2))))
        assert refused.check(StoreUnavailable) and "not yet in step with etcd" in str(refused.value)
        for _ in range(5):
            network.advance(RETRY_DELAY)
        assert started.announced == [] and etcd.calls == []
        network.start()
        network.advance(RETRY_DELAY)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [n.id for n in started.announced[-1].nodes] == ["n1"] and held_nodes(etcd) == ["/fleet/nodes/n1"]
    warnings = [formatEvent(e) for e in events if "could not read the fleet from etcd" in formatEvent(e)]
    assert len(warnings) == 1, warnings
    wanted = FleetState(nodes=(node(1), node(2)))
    assert started.commit(wanted) == wanted


def test_a_slow_etcd_at_start_is_given_up_on_after_the_timeout_and_asked_again(memory, network, etcd, proxy):
    etcd.stalling = True
    started = proxy([node(1)])
    network.advance(TIMEOUT)
    assert started.announced == [] and etcd.calls == ["/v3/kv/range"]
    etcd.stalling = False
    network.advance(RETRY_DELAY)
    assert [n.id for n in started.announced[-1].nodes] == ["n1"]


# -- commits ---------------------------------------------------------------------------------

def test_a_commit_is_one_transaction_and_fires_with_the_fleet_held(etcd, proxy):
    started = proxy([node(1)])
    calls = len(etcd.calls)
    wanted = FleetState(nodes=(node(1, weight=3), node(2)), active_id="n2", policy="least-inflight",
                        removed=("http://10.0.0.9:8000",))
    assert started.commit(wanted) == wanted
    assert etcd.calls[calls:] == ["/v3/kv/txn"]
    assert held_nodes(etcd) == ["/fleet/nodes/n1", "/fleet/nodes/n2"]
    assert json.loads(etcd.value(PREFIX + b"nodes/n1"))["weight"] == 3
    assert etcd.value(PREFIX + b"active") == b"n2" and etcd.value(PREFIX + b"policy") == b"least-inflight"
    assert etcd.value(PREFIX + b"removed/http://10.0.0.9:8000") == b"http://10.0.0.9:8000"
    assert json.loads(etcd.value(PREFIX + b"changed"))["by"] == "proxy-a:1"
    assert started.store.state() == wanted


def test_a_commit_removes_what_the_fleet_no_longer_has(etcd, proxy):
    started = proxy([node(1), node(2)])
    started.commit(FleetState(nodes=(node(1), node(2)), active_id="n1", policy="round-robin"))
    assert started.commit(FleetState(nodes=(node(2),))) == FleetState(nodes=(node(2),))
    assert held_nodes(etcd) == ["/fleet/nodes/n2"]
    assert etcd.value(PREFIX + b"active") is None and etcd.value(PREFIX + b"policy") is None


def test_an_own_write_echoed_back_by_the_watch_announces_nothing(etcd, proxy):
    started = proxy([node(1)])
    before = len(started.announced)
    started.commit(FleetState(nodes=(node(1), node(2))))
    started.network.settle()
    assert len(started.announced) == before


def test_a_commit_from_a_stale_view_is_a_conflict_carrying_the_fresh_fleet(etcd, proxy):
    started = proxy([node(1)])
    etcd.holding_watches = True  # another process writes; this one has not heard yet
    etcd.put(PREFIX + b"nodes/n7", node_value(node(7)))
    etcd.put(PREFIX + b"changed", b'{"by": "proxy-b:1"}')
    lost = started.commit(FleetState(nodes=(node(1), node(2))))
    assert lost.check(StoreConflict)
    assert [n.id for n in lost.value.fresh.nodes] == ["n1", "n7"]
    assert held_nodes(etcd) == ["/fleet/nodes/n1", "/fleet/nodes/n7"]  # nothing of the losing write
    again = attrs.evolve(lost.value.fresh, nodes=lost.value.fresh.nodes + (node(2),))
    assert started.commit(again) == again  # worked out again on the fresh fleet, it goes through
    assert held_nodes(etcd) == ["/fleet/nodes/n1", "/fleet/nodes/n2", "/fleet/nodes/n7"]
    announced = len(started.announced)
    etcd.release_watches()
    started.network.settle()
    assert len(started.announced) == announced  # the other's write was already folded in


def test_etcd_refusing_a_write_is_store_unavailable_and_writes_nothing(etcd, proxy):
    started = proxy([node(1)])
    etcd.refusing = True
    refused = started.commit(FleetState(nodes=(node(1), node(2))))
    assert refused.check(StoreUnavailable)
    assert str(refused.value) == "etcd answered kv/txn with HTTP 503: etcdserver: request timed out"
    assert held_nodes(etcd) == ["/fleet/nodes/n1"] and [n.id for n in started.store.state().nodes] == ["n1"]


def late_commit(network, etcd, proxy):
    """The outcome of a commit etcd never answers, once the timeout passed, and the store."""
    started = proxy([node(1)])
    etcd.stalling = True
    outcomes = []
    started.store.commit(FleetState(nodes=(node(1), node(2)))).addBoth(outcomes.append)
    network.advance(TIMEOUT - 0.01)
    assert outcomes == []
    network.advance(0.01)
    return outcomes[0], started.store


def test_etcd_not_answering_a_write_in_time_is_store_unavailable(network, etcd, proxy):
    late, store = late_commit(network, etcd, proxy)
    assert late.check(StoreUnavailable)
    assert [n.id for n in store.state().nodes] == ["n1"]


def test_etcd_not_answering_in_time_is_told_as_such(network, etcd, proxy):
    late, _ = late_commit(network, etcd, proxy)
    assert str(late.value) == "etcd did not answer kv/txn in time"


def test_etcd_gone_is_store_unavailable_and_the_last_known_fleet_stays(network, etcd, proxy):
    started = proxy([node(1)])
    network.stop()
    outcomes = []
    started.store.commit(FleetState(nodes=(node(1), node(2)))).addBoth(outcomes.append)
    network.advance(TIMEOUT / 2)  # well within the timeout: the connection was refused
    assert outcomes[0].check(StoreUnavailable)
    assert str(outcomes[0].value) == "etcd is unreachable (ConnectionRefusedError)"
    assert [n.id for n in started.store.state().nodes] == ["n1"]


# -- the watch --------------------------------------------------------------------------------

def test_changes_made_elsewhere_are_announced_as_they_arrive(etcd, proxy):
    started = proxy([node(1)])
    etcd.put(PREFIX + b"nodes/n2", node_value(node(2, tags=("a100",))))
    started.network.settle()
    assert [(n.id, n.tags) for n in started.announced[-1].nodes] == [("n1", ()), ("n2", ("a100",))]
    etcd.put(PREFIX + b"policy", b"least-latency")
    etcd.put(PREFIX + b"active", b"n2")
    started.network.settle()
    assert (started.announced[-1].policy, started.announced[-1].active_id) == ("least-latency", "n2")
    etcd.delete(PREFIX + b"nodes/n1")
    started.network.settle()
    assert [n.id for n in started.announced[-1].nodes] == ["n2"]


def test_keys_outside_the_prefix_are_not_heard(etcd, proxy):
    started = proxy([node(1)])
    before = len(started.announced)
    etcd.put(b"/elsewhere/nodes/n2", node_value(node(2)))
    started.network.settle()
    assert len(started.announced) == before


@pytest.fixture
def etcd_errors():
    """The etcd store's error lines written during the test, formatted."""
    lines = []

    def observe(event):
        if event.get("log_namespace") == "blyanproxy.etcd" and event["log_level"] == LogLevel.error:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_a_bad_key_is_never_applied_is_told_once_and_is_left_alone_by_writes(etcd, proxy, etcd_errors):
    started = proxy([node(1)])
    evil = json.loads(node_value(node(2)))
    evil["name"] = "evil\r\nSet-Cookie: injected=1"
    etcd.put(PREFIX + b"nodes/n2", json.dumps(evil).encode())
    etcd.put(PREFIX + b"nodes/bad", b"{not json")
    started.network.settle()
    assert [n.id for n in started.announced[-1].nodes] == ["n1"]
    assert len(etcd_errors) == 2 and all("\r" not in line and "\n" not in line for line in etcd_errors)
    assert "/fleet/nodes/n2" in etcd_errors[0] and "'evil\\r\\nSet-Cookie: injected=1'" in etcd_errors[0]
    assert started.commit(FleetState(nodes=(node(1), node(3)))).nodes == (node(1), node(3))
    assert held_nodes(etcd) == ["/fleet/nodes/bad", "/fleet/nodes/n1", "/fleet/nodes/n2", "/fleet/nodes/n3"]
    assert len(etcd_errors) == 2  # told once, however often the fleet is read
    etcd.put(PREFIX + b"nodes/bad", node_value(Node(id="bad", name="fixed", base_url="http://10.0.0.5:8000")))
    started.network.settle()
    assert [n.id for n in started.announced[-1].nodes] == ["n1", "bad", "n3"]  # in the order the keys were made


def test_an_unknown_policy_from_etcd_is_skipped_and_the_watch_goes_on(memory, network, etcd, etcd_errors):
    registry = NodeRegistry()
    balancer = Balancer(registry, memory, "round-robin")
    store = EtcdStore(memory, parse_state_store("etcd://127.0.0.1:2379/fleet"), TIMEOUT, (node(1),),
                      identity="proxy-a:1")
    keeper = FleetKeeper(registry, balancer, store)
    keeper.restore((node(1),))
    failures = []
    globalLogPublisher.addObserver(failures.append)
    try:
        store.startService()
        network.settle()
        etcd.put(PREFIX + b"policy", b"fastest")
        network.settle()
        etcd.put(PREFIX + b"nodes/n2", node_value(node(2)))  # the watch still delivers
        network.settle()
    finally:
        globalLogPublisher.removeObserver(failures.append)
        store.stopService()
        network.settle()
    assert not [event for event in failures if event.get("log_failure") is not None]
    assert balancer.policy == "round-robin" and [n.id for n in registry.nodes()] == ["n1", "n2"]
    assert any("/fleet/policy" in line and "'fastest' is not one of" in line for line in etcd_errors)


def test_a_broken_watch_is_reopened_from_where_it_was_so_nothing_is_missed(network, etcd, proxy):
    started = proxy([node(1)])
    etcd.end_watches()
    network.settle()
    etcd.put(PREFIX + b"nodes/n2", node_value(node(2)))  # while nobody watches
    network.settle()
    assert etcd.open_watches == 0 and [n.id for n in started.announced[-1].nodes] == ["n1"]
    network.advance(RETRY_DELAY)
    assert etcd.open_watches == 1
    assert [n.id for n in started.announced[-1].nodes] == ["n1", "n2"]


def test_the_watch_is_reopened_once_etcd_is_back(network, etcd, proxy):
    started = proxy([node(1)])
    network.stop()
    for _ in range(4):
        network.advance(RETRY_DELAY)
    assert etcd.open_watches == 0
    etcd.put(PREFIX + b"policy", b"round-robin")  # written while this process could not hear
    network.start()
    network.advance(RETRY_DELAY)
    assert etcd.open_watches == 1 and started.announced[-1].policy == "round-robin"


def test_a_compacted_revision_reads_the_whole_fleet_again(network, etcd, proxy):
    started = proxy([node(1)])
    etcd.end_watches()
    network.settle()
    etcd.put(PREFIX + b"nodes/n2", node_value(node(2)))
    etcd.put(PREFIX + b"nodes/n3", node_value(node(3)))
    etcd.compact()  # the events this process missed are gone
    calls = len(etcd.calls)
    network.advance(RETRY_DELAY)  # the watch reopens from the old revision and is canceled
    assert etcd.calls[calls:] == ["/v3/watch"] and etcd.open_watches == 0
    network.advance(RETRY_DELAY)
    assert etcd.calls[calls:] == ["/v3/watch", "/v3/kv/range", "/v3/watch"] and etcd.open_watches == 1
    assert [n.id for n in started.announced[-1].nodes] == ["n1", "n2", "n3"]
    etcd.put(PREFIX + b"policy", b"round-robin")
    network.settle()
    assert started.announced[-1].policy == "round-robin"


def test_a_stopped_store_watches_no_more_and_retries_nothing(network, etcd, proxy):
    started = proxy([node(1)])
    started.stop()
    assert etcd.open_watches == 0
    calls = len(etcd.calls)
    announced = len(started.announced)
    etcd.put(PREFIX + b"nodes/n2", node_value(node(2)))
    for _ in range(4):
        network.advance(RETRY_DELAY)
    assert len(etcd.calls) == calls and len(started.announced) == announced


def test_a_store_stopped_while_waiting_to_ask_etcd_again_stops_asking(network, etcd, proxy):
    etcd.refusing = True
    started = proxy([node(1)])
    assert etcd.calls == ["/v3/kv/range"]  # refused: the next attempt is RETRY_DELAY away
    started.stop()
    etcd.refusing = False
    for _ in range(4):
        network.advance(RETRY_DELAY)
    assert etcd.calls == ["/v3/kv/range"] and started.announced == []


# -- logging in ------------------------------------------------------------------------------

PASSWORD = "s3cret-Pa55word"


@pytest.fixture
def login(tmp_path, etcd):
    """etcd with authentication on, and the ``EtcdAccess`` of its user (the password in a file)."""
    etcd.require_login("blyan", PASSWORD)
    password_file = tmp_path / "etcd-password"
    password_file.write_text(PASSWORD + "\n")
    return EtcdAccess("blyan", str(password_file))


@pytest.fixture
def etcd_lines():
    """Every log line written during the test, formatted, with its fields."""
    lines = []
    observer = lines.append
    globalLogPublisher.addObserver(observer)
    yield lambda: "\n".join(formatEvent(event) + repr(event) for event in lines)
    globalLogPublisher.removeObserver(observer)


def test_the_store_logs_in_once_and_sends_its_token_with_every_call(etcd, proxy, login):
    started = proxy([node(1)], access=login)
    assert etcd.calls[0] == "/v3/auth/authenticate" and etcd.logins == 1
    assert held_nodes(etcd) == ["/fleet/nodes/n1"] and etcd.open_watches == 1
    assert started.commit(FleetState(nodes=(node(1), node(2)))).nodes == (node(1), node(2))
    assert etcd.logins == 1 and set(etcd.authorizations) == {"token-1.1"}


def test_an_expired_token_is_renewed_and_the_call_made_once_more(etcd, proxy, login):
    started = proxy([node(1)], access=login)
    etcd.expire_tokens()
    assert started.commit(FleetState(nodes=(node(1), node(2)))).nodes == (node(1), node(2))
    assert etcd.logins == 2 and held_nodes(etcd) == ["/fleet/nodes/n1", "/fleet/nodes/n2"]


def test_a_watch_canceled_for_its_token_is_reopened_with_a_fresh_login(network, etcd, proxy, login):
    started = proxy([node(1)], access=login)
    etcd.expire_tokens()
    etcd.end_watches()
    network.settle()
    network.advance(RETRY_DELAY)  # reopened with the stale token: etcd cancels it as Unauthenticated
    assert etcd.open_watches == 0 and etcd.logins == 1
    network.advance(RETRY_DELAY)
    assert etcd.open_watches == 1 and etcd.logins == 2
    etcd.put(PREFIX + b"nodes/n2", node_value(node(2)))
    network.settle()
    assert [n.id for n in started.announced[-1].nodes] == ["n1", "n2"]


def test_a_wrong_password_is_an_outage_naming_the_login_never_the_password(tmp_path, network, etcd, proxy,
                                                                           etcd_lines):
    etcd.require_login("blyan", PASSWORD)
    wrong = tmp_path / "etcd-password"
    wrong.write_text("not-" + PASSWORD)
    started = proxy([node(1)], access=EtcdAccess("blyan", str(wrong)))
    failure = started.commit(FleetState())
    assert failure.check(StoreUnavailable) and not started.announced
    network.advance(RETRY_DELAY)
    logged = etcd_lines()
    assert "auth/authenticate" in logged and "invalid user ID or password" in logged
    assert PASSWORD not in logged and PASSWORD not in str(failure.value)


def test_an_unreadable_password_file_is_an_outage_naming_the_file(tmp_path, etcd, proxy, etcd_lines):
    etcd.require_login("blyan", PASSWORD)
    missing = str(tmp_path / "nowhere")
    started = proxy([node(1)], access=EtcdAccess("blyan", missing))
    assert not started.announced and etcd.calls == []
    assert f"the etcd password file {missing} cannot be read" in etcd_lines()


def test_calls_waiting_for_a_login_share_it(etcd, proxy, login, memory, network):
    started = proxy([node(1)], access=login)
    etcd.expire_tokens()
    outcomes = []
    for index in (2, 3):
        started.store.commit(FleetState(nodes=(node(1), node(index)))).addBoth(outcomes.append)
    network.settle()
    assert etcd.logins == 2 and len(outcomes) == 2
