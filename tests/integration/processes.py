"""Running twistd plugins in child processes for end-to-end tests."""

from __future__ import annotations

import socket
import sys

from twisted.internet.defer import Deferred
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


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
