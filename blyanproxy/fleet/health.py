"""Active health checks: every node probed on a ``LoopingCall``, results fed to ``healthstate``.

A run probes all nodes concurrently and never overlaps the previous one; a
forced check (``check_now``) joins a run in progress instead of starting
another. Each probe knows the node's engine (declared, or detected on first
contact and again when the node comes back, ``core.engines``): it tries that
engine's health paths in order (a 404 means try the next; a 503 while
starting means loading), then reads the models the node serves. Explicit
paths (``HEALTH_PATHS``, or a node's ``metadata["healthPath"]``) override the
engine's: the first accepted status passes. Each request has its own timeout.
A path that would interrupt a busy node (``Profile.busy_paths``: llama-cpp-python
ends a running stream when ``/v1/models`` arrives) is not asked while the node
has requests in flight: that run leaves its health as it was, and the
requests' own outcome (passive health) is the evidence. A failing probe, or a bug in one node's
check, is logged and never stops the loop. A node added at run time is probed
at once. A node that goes down is ``NodeStats.taken_out``: attempts waiting
on it for an answer fail over at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent

from blyanproxy.core import DOWN, LOADING, UP, HealthRules, Node, NodeRegistry, after_loading, after_probe, engines
from blyanproxy.logs import logger
from blyanproxy.twistedinternals import quiet_connection_pool
from blyanproxy.upstream import read_capped

log = logger("health")

#: Largest probe answer read (a model list included); a larger one fails the probe.
MAX_PROBE_BODY = 256 * 1024


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
            result = yield self._probe(node, stats)
            current = self._registry.get(node.id)
            if current is None or current.url != node.url or self._registry.stats(node.id) is not stats:
                return  # removed, re-added or moved while being probed: the answer is stale
            if result.verdict == engines.BUSY:
                return  # serving our requests: their outcome is the evidence this time
            now = self._clock.seconds()
            before = stats.health.state
            if result.verdict == LOADING:
                stats.health = after_loading(stats.health, now)
            else:
                passed = result.verdict == engines.PASSED
                stats.health = after_probe(stats.health, passed, now, self._rules, result.error)
            if result.verdict == engines.PASSED:
                stats.observe_latency((now - started) * 1000.0)
            self._learn(node, stats, result)
            if self.on_probe is not None:
                self.on_probe(node.name, result.verdict == engines.PASSED, now - started)
            after = stats.health.state
            if after != before and after in (UP, DOWN, LOADING):
                log.info(
                    "node {node} is {state}{why}",
                    node=node.name, state=after, why=f" ({result.error})" if result.error else "",
                )
                if after == DOWN:
                    stats.taken_out("down")  # attempts still waiting on it fail over
        except Exception:  # a bug in checking one node must not stop the others
            log.failure("health check of node {node} crashed", node=node.name)

    @staticmethod
    def _learn(node: Node, stats, result: ProbeResult) -> None:
        """Keep what a probe learned: the engine detected, the models served; a node found down is
        detected again when it comes back (it may come back as another engine)."""
        if result.detected is not None and result.detected != stats.engine:
            stats.engine = result.detected
            log.info("node {node} runs {engine}", node=node.name, engine=result.detected)
        if result.models is not None and result.models != stats.models:
            stats.models = result.models
            log.info("node {node} serves {count} model(s): {models}", node=node.name,
                     count=len(result.models), models=", ".join(result.models[:8]))
        if stats.health.state == DOWN and result.verdict != engines.PASSED and node.engine == engines.AUTO:
            stats.engine = None

    @defer.inlineCallbacks
    def _probe(self, node: Node, stats):
        """The ``ProbeResult`` of one health run on ``node``: detection (engine ``auto``, not yet
        detected), the health paths in order, then the models (when none are declared).

        Each request gets ``timeout`` seconds for the whole answer, body included; an
        answer is asked once per run, whichever step needs it.
        """
        answers: dict[str, tuple[engines.Answer | None, str | None]] = {}

        @defer.inlineCallbacks
        def ask(path: str):
            if path not in answers:
                answers[path] = yield self._answer(node.url.text + path, path)
            return answers[path]

        engine = node.engine if node.engine != engines.AUTO else stats.engine
        detected = None
        if node.engine == engines.AUTO and stats.engine is None:
            seen = []
            for path in engines.DETECTION_PATHS:
                answer, _ = yield ask(path)
                if answer is None:
                    break  # no answer at all: nothing to detect this time
                seen.append((path, answer))
                done, found = engines.detect(seen)
                if done:
                    engine = detected = found
                    break
        explicit = node.metadata.get("healthPath") if isinstance(node.metadata.get("healthPath"), str) else None
        paths = (explicit,) if explicit else self._paths
        verdict = engines.FAILED
        error: str | None = "no health path answered"
        busy = engines.profile(engine).busy_paths if stats.in_flight > 0 else frozenset()
        for path in paths or engines.profile(engine).health_paths:
            if path in busy:
                return ProbeResult(engines.BUSY, None, detected, None)
            answer, problem = yield ask(path)
            if answer is None:
                error = problem
                continue
            if paths:  # HEALTH_PATHS or metadata.healthPath: the first accepted status passes
                said = engines.PASSED if answer.status in self._accepted else engines.FAILED
            else:
                said = engines.probe_verdict(engine, answer, self._accepted, stats.health.state == UP)
            if said == engines.NOT_HERE or said == engines.FAILED:
                error = f"{path}: status {answer.status}"
                continue
            verdict, error = said, (None if said == engines.PASSED else f"{path}: loading")
            break
        models = None
        models_path = engines.profile(engine).models_path
        if verdict == engines.PASSED and not node.models and models_path is not None and models_path not in busy:
            answer, _ = yield ask(models_path)
            models = engines.models_from(models_path, answer)
        return ProbeResult(verdict, error, detected, models)

    @defer.inlineCallbacks
    def _answer(self, url: str, path: str):
        """``(Answer, None)`` for ``url``, read to the end of its (capped) body within the
        timeout, or ``(None, what went wrong)``."""
        try:
            response = yield self._http.get(url, allow_redirects=False).addTimeout(self._timeout, self._clock)
            body = yield read_capped(response, MAX_PROBE_BODY).addTimeout(self._timeout, self._clock)
        except defer.TimeoutError:
            return None, f"{path}: no answer within {self._timeout:g} s"
        except Exception as exc:
            return None, f"{path}: {exc.__class__.__name__}"
        return engines.Answer(response.code, body), None


@attrs.frozen
class ProbeResult:
    """What one health run found on a node: ``verdict`` (``engines.PASSED``, ``LOADING`` or
    ``engines.FAILED``) and why it failed, the engine detected (if it was) and the models listed (if read)."""

    verdict: str
    error: str | None
    detected: str | None
    models: tuple[str, ...] | None
