"""Active health checks: every node probed on a ``LoopingCall``, results fed to ``healthstate``.

A run probes all nodes concurrently and never overlaps the previous one; a
forced check (``check_now``) joins a run in progress instead of starting
another. Each probe tries the health paths in order (a node's
``metadata["healthPath"]`` overrides them), each with its own timeout, and
passes on the first accepted status. A failing probe, or a bug in one node's
check, is logged and never stops the loop. A node added at run time is probed
at once. A node that goes down is ``NodeStats.taken_out``: attempts waiting
on it for an answer fail over at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent

from blyanproxy.core import DOWN, UP, HealthRules, Node, NodeRegistry, after_probe
from blyanproxy.logs import logger
from blyanproxy.twistedinternals import quiet_connection_pool
from blyanproxy.upstream import read_capped

log = logger("health")

#: Largest health answer read; a larger one fails the probe.
MAX_PROBE_BODY = 64 * 1024


def probe_client(reactor, endpoints) -> HTTPClient:
    """A treq client for probes: a fresh connection each time (a probe must not ride a
    connection the node may have dropped), reaching nodes as the proxy does."""
    pool = quiet_connection_pool(reactor, persistent=False)
    return HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool))


class HealthMonitor(Service):
    """Probes every registry node every ``interval`` seconds (see the module docstring).

    ``http`` is a treq ``HTTPClient`` (its agent sharing the proxy's TLS trust).
    """

    def __init__(
        self,
        registry: NodeRegistry,
        http,
        clock,
        interval: float,
        timeout: float,
        paths: Sequence[str],
        accepted: frozenset,
        rules: HealthRules,
    ) -> None:
        self._registry = registry
        self._http = http
        self._clock = clock
        self._interval = interval
        self._timeout = timeout
        self._paths = tuple(paths)
        self._accepted = accepted
        self._rules = rules
        self._loop = LoopingCall(self.check_now)
        self._loop.clock = clock
        self._run: defer.Deferred | None = None
        self._joiners: list[defer.Deferred] = []
        self._extra: set = set()  # probes of nodes added or moved between runs
        #: Called with (node name, passed, seconds) after each probe.
        self.on_probe: Callable[[str, bool, float], None] | None = None
        registry.listen(self._on_change)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        pending = list(self._extra) + ([self.check_now()] if self._run is not None else [])
        return defer.DeferredList(pending)  # probes in progress end within their timeout

    def check_now(self) -> defer.Deferred:
        """Probe every node; fires when done. Joins a run already in progress."""
        joined: defer.Deferred = defer.Deferred()
        self._joiners.append(joined)
        if self._run is None:
            probes = [self._check(node) for node in self._registry.nodes()]
            self._run = defer.DeferredList(probes, consumeErrors=True)
            self._run.addBoth(self._run_done)
        return joined

    def _run_done(self, _) -> None:
        self._run = None
        joiners, self._joiners = self._joiners, []
        for joined in joiners:
            joined.callback(None)

    def _on_change(self, event: str, node: Node) -> None:
        if event in ("added", "updated") and self.running:
            probe = self._check(node)
            self._extra.add(probe)
            probe.addBoth(lambda _: self._extra.discard(probe))

    @defer.inlineCallbacks
    def _check(self, node: Node):
        """Probe one node and record the result; never fails."""
        try:
            stats = self._registry.stats(node.id)
            started = self._clock.seconds()
            passed, error = yield self._probe(node)
            current = self._registry.get(node.id)
            if current is None or current.url != node.url or self._registry.stats(node.id) is not stats:
                return  # removed, re-added or moved while being probed: the answer is stale
            now = self._clock.seconds()
            before = stats.health.state
            stats.health = after_probe(stats.health, passed, now, self._rules, error)
            if passed:
                stats.observe_latency((now - started) * 1000.0)
            if self.on_probe is not None:
                self.on_probe(node.name, passed, now - started)
            after = stats.health.state
            if after != before and after in (UP, DOWN):
                log.info(
                    "node {node} is {state}{why}",
                    node=node.name, state=after, why=f" ({error})" if error else "",
                )
                if after == DOWN:
                    stats.taken_out("down")  # attempts still waiting on it fail over
        except Exception:  # a bug in checking one node must not stop the others
            log.failure("health check of node {node} crashed", node=node.name)

    @defer.inlineCallbacks
    def _probe(self, node: Node):
        """``(passed, error)``: the first path that answers an accepted status wins.

        Each path gets ``timeout`` seconds for the whole answer, body included.
        """
        path = node.metadata.get("healthPath") if isinstance(node.metadata.get("healthPath"), str) else None
        error = "no health path answered"
        for candidate in (path,) if path else self._paths:
            try:
                status = yield self._status_of(node.url.text + candidate)
            except defer.TimeoutError:
                error = f"{candidate}: no answer within {self._timeout:g} s"
                continue
            except Exception as exc:
                error = f"{candidate}: {exc.__class__.__name__}"
                continue
            if status in self._accepted:
                return True, None
            error = f"{candidate}: status {status}"
        return False, error

    def _status_of(self, url: str) -> defer.Deferred:
        """The status of ``url``, read to the end of its (capped) body within the timeout."""
        answer = self._http.get(url, allow_redirects=False)
        answer.addCallback(
            lambda response: read_capped(response, MAX_PROBE_BODY, keep=False).addCallback(lambda _: response.code)
        )
        return answer.addTimeout(self._timeout, self._clock)
