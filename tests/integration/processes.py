"""Running twistd plugins in child processes for end-to-end tests."""

from __future__ import annotations

import random
import signal
import socket
import sys
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as GaveUpWaiting
from twisted.internet.protocol import ProcessProtocol

#: ``twistd -n`` run by this interpreter (the venv's, with the plugins installed).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n"]
#: ``twist`` (``python -m twisted``), the newer runner.
TWIST = [sys.executable, "-m", "twisted"]


class ProcessCapture(ProcessProtocol):
    """Collects a child's output; ``ended`` fires with ``(exit code, signal)``."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended.callback((reason.value.exitCode, getattr(reason.value, "signal", None)))


class Child:
    """A twistd child process: started, signalled, waited for."""

    def __init__(self, reactor, argv: list[str], env: dict, cwd: str) -> None:
        self._reactor = reactor
        self._argv, self._env, self._cwd = argv, env, cwd
        self.process: ProcessCapture | None = None
        self._transport = None

    def start(self) -> None:
        """Start it (again: a fresh process with the same command)."""
        self.process = ProcessCapture()
        self._transport = self._reactor.spawnProcess(self.process, self._argv[0], self._argv, env=self._env,
                                                     path=self._cwd)

    @property
    def pid(self) -> int:
        """The process id of the latest start."""
        return self._transport.pid

    @property
    def running(self) -> bool:
        """Whether it was started and has not ended."""
        return self.process is not None and not self.process.ended.called

    def signal(self, name: int) -> None:
        """Send it a signal, if it runs."""
        if self.running:
            self._transport.signalProcess(name)

    async def stop(self, timeout: float = 30.0):
        """SIGCONT (it may be frozen) and SIGTERM, then wait; its ``(exit code, signal)``."""
        if not self.running:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return await self.process.ended.addTimeout(timeout, self._reactor)
        except GaveUpWaiting:
            self.signal(signal.SIGKILL)
            return await self.process.ended


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that was free a moment ago, below the kernel's ephemeral range.

    A child process binds it a little later. A port from ``bind(0)`` could meanwhile
    become the local end of some outgoing connection (those come from the same range),
    and the child's bind would fail; ports below the range are never handed out so.
    """
    low = max(_ephemeral_low(), 2048)
    for _ in range(200):
        port = random.randrange(low // 2, low)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port below the ephemeral range")
