"""Process signals under twistd: SIGTERM stops gracefully and exits 0, SIGHUP reloads.

The reactor's own SIGTERM handler stops the reactor too, but remembers the
signal, and twistd then re-raises it so that the process ends "killed by
SIGTERM". A stop the proxy asked for and completed (the drain, the state
saved) is a clean exit, so once the reactor runs (its handlers are installed
by then) SIGTERM is handled here: the same ``reactor.stop()``, without the
signal being re-raised, so twistd exits with status 0. SIGINT keeps Twisted's
handling (the same graceful stop, then the signal's exit status). twistd
installs nothing for SIGHUP, whose default would end the process; here it
calls the reload.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Callable, cast

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning

from blyanproxy.logs import logger

if TYPE_CHECKING:
    from types import FrameType

    from twisted.internet.interfaces import IReactorCore, IReactorFromThreads

log = logger("signals")


class ProcessSignals(Service):
    """Installs the SIGTERM and SIGHUP handlers once the reactor runs (twistd processes only).

    ``install`` is ``signal.signal``, or a stand-in in tests. ``reactor`` also runs calls from
    other threads (``IReactorFromThreads``): a signal handler hands its work over that way.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        on_hangup: Callable[[], object],
        install: Callable[[int, Callable[[int, FrameType | None], None]], object] = signal.signal,
    ) -> None:
        self._reactor = reactor
        self._on_hangup = on_hangup
        self._install = install

    def startService(self) -> None:
        """Install the handlers as soon as the reactor runs (twistd's own are in place by then)."""
        super().startService()
        self._reactor.callWhenRunning(self._install_handlers)

    def _install_handlers(self) -> None:
        self._install(signal.SIGTERM, self._terminate)
        self._install(signal.SIGHUP, self._hangup)

    def _terminate(self, number: int, frame: FrameType | None) -> None:
        # A signal handler only schedules: the work happens in the reactor's thread.
        cast("IReactorFromThreads", self._reactor).callFromThread(self._stop)

    def _hangup(self, number: int, frame: FrameType | None) -> None:
        cast("IReactorFromThreads", self._reactor).callFromThread(self._reload)

    def _stop(self) -> None:
        log.info("SIGTERM: stopping gracefully")
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            log.info("SIGTERM: already stopping")

    def _reload(self) -> None:
        log.info("SIGHUP: reloading settings")
        self._on_hangup()
