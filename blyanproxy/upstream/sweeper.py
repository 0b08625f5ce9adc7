"""The upstream pool as a service: idle connections closed past their time, all of them at stop."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from blyanproxy.upstream.client import UpstreamPool


class UpstreamPoolService(Service):
    """Closes idle upstream connections past their time, and every one when the proxy stops."""

    def __init__(self, pool: UpstreamPool, clock: IReactorTime, idle_timeout: float) -> None:
        self._pool = pool
        self._sweeper = LoopingCall(pool.sweep)
        self._sweeper.clock = clock
        self._interval = max(idle_timeout / 2, 0.05)

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self._interval, now=False)

    def stopService(self) -> Deferred[list[None]]:
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        return self._pool.close()
