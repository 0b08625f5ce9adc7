"""Engine load figures: every node's own report read on a ``LoopingCall`` (``LOAD_INTERVAL_MS``).

Each run reads every node concurrently and never overlaps the previous one. A node's engine
(declared, else detected by the health monitor) says where its load is read
(``core.load_paths``: vLLM, SGLang and TGI ``/metrics``, llama.cpp ``/metrics`` else ``/slots``,
Ollama ``/api/ps``); a node whose engine reports nothing, or is not known yet, is not asked.
Each answer has ``timeout`` seconds and at most ``MAX_LOAD_BODY`` bytes. New figures replace the
node's ``NodeStats.load`` with this process's in-flight count then; a failed read leaves the old figures
to go stale (older than three intervals: unknown to the policies). A failure, or a bug in one
node's read, is logged and never stops the loop.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from blyanproxy.core import Node, NodeRegistry, engine_of, figures_from, load_paths
from blyanproxy.logs import logger
from blyanproxy.upstream import read_capped

log = logger("load")

#: Largest load answer read (a /metrics page); a larger one gives no figures.
MAX_LOAD_BODY = 512 * 1024


class LoadMonitor(Service):
    """Reads every registry node's load figures every ``interval`` seconds (see the module docstring).

    ``http`` is a treq ``HTTPClient`` (the health monitor's probe client suits it).
    """

    def __init__(self, registry: NodeRegistry, http, clock, interval: float, timeout: float) -> None:
        self._registry = registry
        self._http = http
        self._clock = clock
        self.interval = interval
        self._timeout = timeout
        self._loop = LoopingCall(self.read_now)
        self._loop.clock = clock
        self._run: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._run if self._run is not None else defer.succeed(None)

    def read_now(self) -> defer.Deferred:
        """Read every node's figures; fires when done (at once if a run is still going)."""
        if self._run is not None:
            return defer.succeed(None)
        reads = [self._read(node) for node in self._registry.nodes()]
        self._run = run = defer.DeferredList(reads, consumeErrors=True)
        run.addBoth(self._done)
        return run

    def _done(self, _) -> None:
        self._run = None

    @defer.inlineCallbacks
    def _read(self, node: Node):
        """Read one node's figures and keep them; never fails."""
        try:
            stats = self._registry.stats(node.id)
            engine = engine_of(node.engine, stats.engine)
            for path in load_paths(engine):
                answer = yield self._answer(node.url.text + path)
                if answer is None:
                    continue
                status, body = answer
                assert engine is not None  # load_paths of None is empty
                figures = figures_from(engine, path, status, body, self._clock.seconds())
                if figures is not None:
                    if self._registry.get(node.id) is not None and self._registry.stats(node.id) is stats:
                        stats.load = figures
                        stats.in_flight_at_read = stats.in_flight
                    return
        except Exception:  # a bug in reading one node must not stop the others
            log.failure("load read of node {node} crashed", node=node.name)

    @defer.inlineCallbacks
    def _answer(self, url: str):
        """``(status, body)`` of ``url`` within the timeout and the size cap, or ``None``."""
        try:
            response = yield self._http.get(url, allow_redirects=False).addTimeout(self._timeout, self._clock)
            body = yield read_capped(response, MAX_LOAD_BODY).addTimeout(self._timeout, self._clock)
        except Exception as exc:
            log.debug("load read {url} failed: {error}", url=url, error=exc.__class__.__name__)
            return None
        return response.code, body
