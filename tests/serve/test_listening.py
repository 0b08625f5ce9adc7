"""The proxy's Listener: it listens before the reactor runs, tells its address, and a taken port ends start-up."""

import socket

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher

from blyanproxy.serve import Listener


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
