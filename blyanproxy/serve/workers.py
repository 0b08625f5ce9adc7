"""Several proxy processes on one host, accepting on one listening port (``--workers N``).

One Twisted process uses one core. With ``WORKERS=N`` the ``twistd`` process
becomes a supervisor: it binds the listening socket once (before twistd
drops privileges), never accepts on it, and starts N worker processes
(``twistd -n blyan-proxy`` with the same options) that inherit the socket
as file descriptor 3 and accept on it (``reactor.adoptStreamPort``). The
kernel hands each new connection to whichever worker accepts first. A
shared socket was chosen over ``SO_REUSEPORT`` because connections waiting
in the backlog are never lost when a worker dies (with ``SO_REUSEPORT`` each
worker has its own backlog, reset with it), and because it needs only
Twisted's public API. Each worker is a whole proxy: its own health checks,
ejections, in-flight counts and metrics; the fleet is shared through
``STATE_STORE`` (etcd).

- A worker that exits is started again, after 0.5 s doubling up to 30 s while
  workers keep dying young (the delay resets once one has run a minute).
- SIGTERM (or SIGINT) to the supervisor is passed to every worker, which
  stops accepting and drains; the supervisor exits once all are gone, or
  kills what is left after ``WORKER_STOP_TIMEOUT_MS``.
- A worker watches a pipe from the supervisor on its standard input: if the
  supervisor dies (even by SIGKILL), the worker stops too.
- Workers write to the supervisor's standard output and error.

A worker learns its role from ``BLYANPROXY_WORKER=<index>:<fd>:<family>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import attrs
from twisted.application.service import Service
from twisted.internet import fdesc
from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol, Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from blyanproxy.logs import logger
from blyanproxy.serve.listening import cannot_listen

if TYPE_CHECKING:
    from twisted.internet import tcp
    from twisted.internet.interfaces import (
        IDelayedCall,
        IListeningPort,
        IReactorCore,
        IReactorFDSet,
        IReactorProcess,
        IReactorSocket,
        IReactorTime,
    )

log = logger("workers")

WORKER_ENV = "BLYANPROXY_WORKER"
LISTEN_FD = 3
FIRST_DELAY = 0.5
LONGEST_DELAY = 30.0
SETTLED_AFTER = 60.0  # seconds a worker must live for the restart delay to reset


@attrs.frozen
class WorkerRole:
    """What a worker process was told: its number (from 1) and the inherited listening socket."""

    index: int
    fd: int
    family: int


def worker_role(env: Mapping[str, str]) -> WorkerRole | None:
    """The role in ``BLYANPROXY_WORKER``, or ``None`` in a process that is not a worker."""
    text = env.get(WORKER_ENV)
    if not text:
        return None
    index, fd, family = (int(part) for part in text.split(":"))
    return WorkerRole(index=index, fd=fd, family=family)


def restart_delay(quick_exits: int) -> float:
    """Seconds before starting a worker again after ``quick_exits`` early deaths in a row."""
    return min(FIRST_DELAY * 2 ** max(quick_exits - 1, 0), LONGEST_DELAY)


def worker_endpoint(reactor: IReactorSocket, role: WorkerRole) -> AdoptedStreamServerEndpoint:
    """The endpoint a worker listens on: the supervisor's socket."""
    return AdoptedStreamServerEndpoint(reactor, role.fd, role.family)


@implementer(IReadDescriptor)
class ParentWatch:
    """Stops the reactor when the supervisor's pipe on ``fd`` closes (the supervisor is gone).

    ``reactor`` watches the descriptor and is stopped (``IReactorCore`` too).
    """

    def __init__(self, reactor: IReactorFDSet, fd: int = 0) -> None:
        self._reactor = reactor
        self._fd = fd
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        """The watched descriptor."""
        return self._fd

    def doRead(self) -> None:
        """Read what the supervisor sent (nothing, normally); at end of file, stop the reactor."""
        if os.read(self._fd, 4096):
            return None
        self._reactor.removeReader(self)
        log.warn("the supervisor is gone; this worker stops")
        cast("IReactorCore", self._reactor).stop()
        return None

    def connectionLost(self, reason: Failure) -> None:
        """Nothing to clean up: the descriptor is the process's standard input."""

    def logPrefix(self) -> str:
        """How the reactor's log names this descriptor."""
        return "ParentWatch"


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int, started: float) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason.value)


class WorkerSupervisor(Service):
    """Binds ``listen``, keeps ``count`` workers running ``argv``, stops them on the way out.

    ``reactor`` keeps time and spawns the workers (``IReactorProcess`` too).
    """

    def __init__(self, reactor: IReactorTime, listen: str, count: int, argv: Sequence[str],
                 env: Mapping[str, str], stop_timeout: float) -> None:
        self._reactor = reactor
        self._listen = listen
        self._count = count
        self._argv = list(argv)
        self._env = dict(env)
        self._stop_timeout = stop_timeout
        self._port: tcp.Port | None = None
        self._workers: dict[int, _Worker] = {}
        self._quick_exits: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}

    def privilegedStartService(self) -> None:
        """Bind the listening socket (before twistd drops privileges), never to accept on it.

        A port that cannot be had ends start-up with one line (``SystemExit``)."""
        super().privilegedStartService()
        holder = ServerFactory.forProtocol(Protocol)
        holder.noisy = False  # it never accepts: no "Starting factory" line
        bound: list[IListeningPort | Failure] = []  # a TCP or UNIX endpoint listens at once: it has fired
        serverFromString(self._reactor, self._listen).listen(holder).addBoth(bound.append)
        if isinstance(bound[0], Failure):
            raise cannot_listen(self._listen, bound[0])
        self._port = cast("tcp.Port", bound[0])  # TCP and UNIX endpoints listen with a tcp.Port
        self._port.stopReading()  # the workers accept; the supervisor only holds the socket

    def startService(self) -> None:
        """Bind if not done yet, then start the workers."""
        if self._port is None:
            self.privilegedStartService()
        super().startService()
        log.info("starting {count} workers on {listen}", count=self._count, listen=self._listen)
        for index in range(1, self._count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        port = self._port
        assert port is not None  # bound by privilegedStartService
        family = port.socket.family
        env = dict(self._env, **{WORKER_ENV: f"{index}:{LISTEN_FD}:{int(family)}"})
        worker = _Worker(self, index, self._reactor.seconds())
        transport = cast("IReactorProcess", self._reactor).spawnProcess(
            worker, self._argv[0], self._argv, env=env,
            childFDs={0: "w", 1: 1, 2: 2, LISTEN_FD: port.fileno()},
        )
        self._workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def _ended(self, worker: _Worker, status: BaseException | None) -> None:
        self._workers.pop(worker.index, None)
        if not self.running:
            return
        lived = self._reactor.seconds() - worker.started
        quick = 0 if lived >= SETTLED_AFTER else self._quick_exits.get(worker.index, 0) + 1
        self._quick_exits[worker.index] = quick
        delay = restart_delay(quick)
        log.warn("worker {index} exited ({status}) after {lived:.1f} s; starting it again in {delay:g} s",
                 index=worker.index, status=_describe(status), lived=lived, delay=delay)
        self._restarts[worker.index] = self._reactor.callLater(delay, self._spawn, worker.index)

    def stopService(self) -> Deferred[None]:
        """Cancel pending restarts, TERM every worker (KILL after the timeout), then close the socket."""
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        workers = list(self._workers.values())
        log.info("stopping {count} workers", count=len(workers))
        for worker in workers:
            _signal(worker, "TERM")
        everyone = DeferredList([worker.ended for worker in workers])

        def too_slow(failure: Failure) -> Deferred[list[tuple[bool, None]]]:
            failure.trap(TimeoutError)
            for worker in workers:
                if not worker.ended.called:
                    log.warn("worker {index} did not stop within {timeout:g} s; killing it",
                             index=worker.index, timeout=self._stop_timeout)
                    _signal(worker, "KILL")
            return DeferredList([worker.ended for worker in workers])

        everyone.addTimeout(self._stop_timeout, self._reactor).addErrback(too_slow)
        return everyone.addCallback(lambda _: cast("tcp.Port", self._port).stopListening())


def _signal(worker: _Worker, name: str) -> None:
    transport = worker.transport
    assert transport is not None  # connected by spawnProcess
    try:
        transport.signalProcess(name)
    except ProcessExitedAlready:
        pass


def _describe(status: BaseException | None) -> str:
    signal = getattr(status, "signal", None)
    if signal:
        return f"signal {signal}"
    return f"code {getattr(status, 'exitCode', '?')}"
