"""The proxy's Listener: it listens before the reactor runs, tells its address, and a taken port ends start-up."""

import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher

from blyanproxy.serve import Listener, with_backlog

from ..integration.tools import require_program


@pytest.fixture
def critical_lines():
    lines = []

    def observe(event):
        if event.get("log_namespace") == "blyanproxy.listen":
            lines.append((event["log_level"].name, formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def quiet_factory():
    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    return factory


@pytest_twisted.ensureDeferred
async def test_it_listens_at_privileged_start_and_tells_the_bound_address(reactor):
    told = []
    listener = Listener(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), quiet_factory(),
                        "tcp:0:interface=127.0.0.1", told.append)
    listener.privilegedStartService()
    listener.startService()  # does not listen twice
    port = listener.port.getHost().port
    assert told == [f"127.0.0.1:{port}"]
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    await listener.stopService()
    assert listener.port is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_is_told_by_its_path(reactor, tmp_path):
    told = []
    path = str(tmp_path / "proxy.sock")
    listener = Listener(UNIXServerEndpoint(reactor, path), quiet_factory(), f"unix:{path}", told.append)
    listener.startService()
    assert told == [path]
    await listener.stopService()


def test_a_port_in_use_is_one_critical_line_and_exit_status_1(reactor, critical_lines):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        told = []
        listener = Listener(TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), quiet_factory(),
                            f"tcp:{port}:interface=127.0.0.1", told.append)
        with pytest.raises(SystemExit) as stopped:
            listener.privilegedStartService()
    assert stopped.value.code == 1
    assert critical_lines == [
        ("critical", f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use")]
    assert told == [] and listener.port is None


@pytest.mark.parametrize(("description", "expected"), [
    ("tcp:9000:interface=127.0.0.1", "tcp:9000:interface=127.0.0.1:backlog=4096"),
    ("ssl:443:privateKey=k.pem:certKey=c.pem", "ssl:443:privateKey=k.pem:certKey=c.pem:backlog=4096"),
    ("unix:/run/blyan.sock", "unix:/run/blyan.sock:backlog=4096"),
    ("TCP:9000", "TCP:9000:backlog=4096"),
    ("tcp:9000:backlog=10", "tcp:9000:backlog=10"),  # the operator's own wins
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # takes no backlog
    ("adopt:fileno=3:addressFamily=INET", "adopt:fileno=3:addressFamily=INET"),
])
def test_a_listening_description_gets_the_backlog_unless_it_names_one(description, expected):
    assert with_backlog(description, 4096) == expected


@pytest_twisted.ensureDeferred
async def test_the_kernel_queues_as_many_connections_as_the_backlog_asks(reactor):
    ss = require_program("ss")
    endpoint = serverFromString(reactor, with_backlog("tcp:0:interface=127.0.0.1", 777))
    port = await endpoint.listen(quiet_factory())
    try:
        number = port.getHost().port
        shown = subprocess.run([ss, "-Hltn", f"sport = :{number}"], capture_output=True, text=True, timeout=10)
        state, queued, backlog = shown.stdout.split()[:3]
        assert (state, backlog) == ("LISTEN", "777")  # ss shows a listening socket's backlog as its Send-Q
    finally:
        await port.stopListening()
