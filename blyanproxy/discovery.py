"""Per-API-key workload discovery: the cache of each key's nodes, fetched, refreshed and forgotten.

``WorkloadDirectory.lookup(key)`` answers from the cache or asks the API
(concurrent first requests for a key share one call); a ``LoopingCall``
refreshes the keys in use and forgets idle ones. The timing rules are the
pure functions of ``keycache``. Keys are held in memory only to ask the API
again; logs and metrics name a key by ``apikeys.key_id``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from . import keycache
from .apikeys import key_id
from .errors import ProxyError
from .logs import logger
from .pools import KeyedBalancer, KeyPool
from .workloads import NodeAddressing, workload_nodes
from .workloadsapi import KeyRefused

log = logger("discovery")

#: Seconds between two passes of the refresh loop (each pass refreshes only what is due).
SWEEP_SECONDS = 1.0


@attrs.define(eq=False)
class KeyRecord:
    """One cached key: its state, when it was last used, its requests in flight."""

    key: bytes = attrs.field(repr=False)
    name: str
    state: keycache.KeyState
    last_used: float
    in_flight: int = 0
    fetching: bool = False
    waiters: List[defer.Deferred] = attrs.Factory(list)

    def finished(self, _=None) -> None:
        """One request of this key ended (pairs with ``WorkloadDirectory.started``)."""
        self.in_flight -= 1


class WorkloadDirectory(Service):
    """The per-key cache of workloads, and the loop that keeps it current.

    ``client.fetch(key)`` returns a Deferred of the key's workloads or fails
    with ``KeyRefused`` / ``WorkloadsUnavailable``; ``client.close()`` drops its
    connections when the service stops (``workloadsapi.WorkloadsClient``).
    At most ``max_keys`` keys are cached (the least recently used goes) and
    at most ``max_fetches`` API calls run at once.
    """

    def __init__(self, client, clock, balancer: KeyedBalancer,
                 limits: keycache.CacheLimits = keycache.CacheLimits(),
                 addressing: NodeAddressing = NodeAddressing(), max_keys: int = 10000,
                 max_fetches: int = 8, metrics=None) -> None:
        self._client = client
        self._clock = clock
        self.balancer = balancer
        self._limits = limits
        self._addressing = addressing
        self._max_keys = max_keys
        self._calls = defer.DeferredSemaphore(max_fetches)
        self._metrics = metrics
        self._records: "OrderedDict[bytes, KeyRecord]" = OrderedDict()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(min(SWEEP_SECONDS, self._limits.refresh), now=False)

    def stopService(self):
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        return self._client.close()

    # -- lookups --------------------------------------------------------------

    @property
    def key_count(self) -> int:
        """How many keys are cached."""
        return len(self._records)

    def lookup(self, key: bytes) -> defer.Deferred:
        """The key's ``KeyRecord`` once its list can be used (it may list no running workload).

        Fails with ``ProxyError``: 401 when the API refused the key, 502 when
        the API failed and nothing recent enough is cached.
        """
        record = self._record_for(key)
        decision = keycache.decide(record.state, self._clock.seconds(), self._limits)
        self._count("cache", "miss" if decision == keycache.FETCH else "hit")
        if decision != keycache.FETCH:
            return defer.maybeDeferred(self._answer, record, decision)
        waiter: defer.Deferred = defer.Deferred()
        record.waiters.append(waiter)
        self._start_fetch(record)
        waiter.addCallback(lambda _: self._answer(
            record, keycache.decide(record.state, self._clock.seconds(), self._limits, may_fetch=False)))
        return waiter

    def pool(self, record: KeyRecord) -> KeyPool:
        """The pool of the key's usable nodes (404 ``ProxyError`` when there are none)."""
        if not record.state.nodes:
            raise ProxyError(404, "no_workloads", "No running workloads found")
        return KeyPool(record.state.nodes, self.balancer)

    def started(self, record: KeyRecord) -> None:
        """A request of this key started (it is not forgotten while in flight): pair with ``finished``."""
        record.in_flight += 1

    def _answer(self, record: KeyRecord, decision: str) -> KeyRecord:
        if decision == keycache.REJECTED:
            raise ProxyError(401, "api_key_rejected", "the workloads API does not accept this API key")
        if decision == keycache.UNAVAILABLE:
            raise ProxyError(502, "workloads_unavailable", "the workloads API is unavailable")
        return record

    def _record_for(self, key: bytes) -> KeyRecord:
        now = self._clock.seconds()
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
        else:
            while len(self._records) >= self._max_keys:
                self._evict_one()
            record = self._records[key] = KeyRecord(key=key, name=key_id(key), state=keycache.KeyState(),
                                                    last_used=now)
        record.last_used = now
        return record

    def _evict_one(self) -> None:
        """Forget the least recently used key, preferring one with nothing in flight."""
        victim = next((k for k, r in self._records.items() if r.in_flight == 0 and not r.fetching),
                      next(iter(self._records)))
        log.info("forgetting {key}: the cache holds {count} keys", key=self._records[victim].name,
                 count=self._max_keys)
        del self._records[victim]

    # -- fetching -------------------------------------------------------------

    def _start_fetch(self, record: KeyRecord) -> None:
        """Ask the API for this key unless a call is already under way; never fails."""
        if record.fetching:
            return
        record.fetching = True
        call = self._calls.run(self._client.fetch, record.key)
        call.addCallbacks(self._fetched, self._fetch_failed, (record,), None, (record,), None)
        call.addErrback(lambda failure: log.failure("workloads refresh of {key} crashed", failure,
                                                    key=record.name))
        call.addBoth(self._fetch_done, record)

    def _fetched(self, workloads: tuple, record: KeyRecord) -> None:
        now = self._clock.seconds()
        before = record.state
        nodes = workload_nodes(workloads, self._addressing)
        record.state = keycache.after_fetch(before, keycache.FETCHED, now, workloads, nodes)
        self._count("api", "ok" if nodes else "empty")
        joined, left = keycache.node_changes(before.nodes, nodes)
        if before.fetched_at is None or joined or left:
            log.info(
                "{key}: {count} running workload(s){joined}{left}",
                key=record.name, count=len(nodes),
                joined=f"; joined: {', '.join(joined)}" if joined and before.fetched_at is not None else "",
                left=f"; left: {', '.join(left)}" if left else "",
            )

    def _fetch_failed(self, failure, record: KeyRecord) -> None:
        now = self._clock.seconds()
        refused = failure.check(KeyRefused) is not None
        outcome = keycache.KEY_REFUSED if refused else keycache.FAILED
        record.state = keycache.after_fetch(record.state, outcome, now)
        self._count("api", "refused" if refused else "failed")
        if refused:
            log.info("{key}: {why}", key=record.name, why=failure.getErrorMessage())
        else:
            log.warn("{key}: workloads not refreshed: {why}", key=record.name, why=failure.getErrorMessage())

    def _fetch_done(self, _, record: KeyRecord) -> None:
        record.fetching = False
        waiters, record.waiters = record.waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- the loop -------------------------------------------------------------

    def sweep(self) -> None:
        """One pass of the loop: forget idle keys, refresh those due, drop unused node figures."""
        now = self._clock.seconds()
        limits = self._limits
        for key, record in list(self._records.items()):
            if keycache.is_idle(record.last_used, record.in_flight, now, limits) and not record.fetching:
                del self._records[key]
                log.debug("forgot idle {key}", key=record.name)
            elif keycache.refresh_due(record.state, now, limits):
                self._start_fetch(record)
        self.balancer.prune(frozenset(node.base_url for record in self._records.values()
                                      for node in record.state.nodes))
        if self._metrics is not None:
            self._metrics.cached_keys(len(self._records))

    def _count(self, what: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.workloads_event(what, outcome)

