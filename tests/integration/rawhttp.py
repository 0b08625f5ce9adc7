"""A raw TCP HTTP client for tests that need control below treq: not reading, hanging up, odd framing."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


class RawClient(Protocol):
    """Sends bytes, records what arrives (with arrival times), can pause reading or hang up."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.received = b""
        self.arrivals: list = []
        self.closed = defer.Deferred()
        self._waiters: list = []

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.arrivals.append((self.clock.seconds(), data))
        for marker, waiter in list(self._waiters):
            if marker in self.received:
                self._waiters.remove((marker, waiter))
                waiter.callback(self.received)

    def connectionLost(self, reason) -> None:
        for _, waiter in self._waiters:
            waiter.errback(reason)
        self._waiters = []
        self.closed.callback(self.received)

    def wait_for(self, marker: bytes, timeout: float = 5.0) -> defer.Deferred:
        """Fires with everything received once ``marker`` has arrived."""
        if marker in self.received:
            return defer.succeed(self.received)
        waiter = defer.Deferred()
        self._waiters.append((marker, waiter))
        return waiter.addTimeout(timeout, self.clock)

    def wait_closed(self, timeout: float = 5.0) -> defer.Deferred:
        """Fires with everything received once the server closed the connection."""
        return self.closed.addTimeout(timeout, self.clock)


async def connect(reactor, url: str) -> RawClient:
    """A ``RawClient`` connected to ``http://127.0.0.1:port``."""
    port = int(url.rsplit(":", 1)[1])
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), RawClient(reactor))


async def sleep(reactor, seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def eventually(reactor, condition, timeout: float = 5.0, step: float = 0.02):
    """Wait until ``condition()`` is true; fail the test after ``timeout`` seconds."""
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition still false after {timeout} s")
        await sleep(reactor, step)
        waited += step


def error_code(document: dict) -> str:
    """The code word of a proxy error in either JSON shape: OpenAI's (``/v1`` paths) or the proxy's own."""
    error = document["error"]
    return error["code"] if isinstance(error, dict) else document["code"]
