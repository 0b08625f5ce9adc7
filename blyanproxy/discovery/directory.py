"""Per-API-key workload discovery: the cache of each key's nodes, fetched, refreshed and forgotten.

``WorkloadDirectory.lookup(key, client)`` answers from the cache or asks the
API (concurrent first requests for a key share one call); a ``LoopingCall``
refreshes the keys in use and forgets idle ones. The timing rules are the
pure functions of ``keycache``; which call gets a slot is ``callslots``'
rule (known keys first, first lookups of unknown keys limited per client
address and shared fairly among addresses). Keys are held in memory only to
ask the API again; logs and metrics name a key by ``apikeys.key_id``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from blyanproxy.core import ProxyError
from blyanproxy.discovery import keycache
from blyanproxy.discovery.apikeys import key_id
from blyanproxy.discovery.callslots import CallSlots
from blyanproxy.discovery.pools import KeyedBalancer, KeyPool
from blyanproxy.discovery.workloads import NodeAddressing, workload_nodes
from blyanproxy.discovery.workloadsapi import KeyRefused
from blyanproxy.logs import logger

log = logger("discovery")

#: Seconds between two passes of the refresh loop (each pass refreshes only what is due).
SWEEP_SECONDS = 1.0
#: First lookups waiting for a call slot, per slot, before new keys are refused 503.
QUEUE_PER_CALL = 8
#: Records looked at from the least recently used end when one must be forgotten.
EVICTION_SCAN = 64


class _NobodyWaits(Exception):
    """A queued first-request call whose requests all gave up: not made."""


def _busy_error() -> ProxyError:
    return ProxyError(503, "workloads_busy", "too many API keys are being looked up; try again", retry_after=1)


def _client_limited_error() -> ProxyError:
    return ProxyError(429, "too_many_new_keys", "too many new API keys are being looked up from this address; "
                      "try again", retry_after=1)


@attrs.define(eq=False)
class KeyRecord:
    """One cached key: its state, when it was last used, its requests in flight."""

    key: bytes = attrs.field(repr=False)
    name: str
    state: keycache.KeyState
    last_used: float
    in_flight: int = 0
    fetching: bool = False
    waiters: list[defer.Deferred] = attrs.Factory(list)

    def finished(self, _=None) -> None:
        """One request of this key ended (pairs with ``WorkloadDirectory.started``)."""
        self.in_flight -= 1


class WorkloadDirectory(Service):
    """The per-key cache of workloads, and the loop that keeps it current.

    ``client.fetch(key)`` returns a Deferred of the key's workloads or fails
    with ``KeyRefused`` / ``WorkloadsUnavailable``; ``client.close()`` drops its
    connections when the service stops (``workloadsapi.WorkloadsClient``).
    At most ``max_keys`` keys are cached (the least recently used idle key
    goes, keys without a usable list first) and at most ``max_fetches`` API
    calls run at once (``callslots.CallSlots``: refreshes and other calls of
    keys the API has listed go first; a client address has at most
    ``lookups_per_client`` first lookups of unknown keys under way); a
    request waits at most ``wait_limit`` seconds for its key's list.
    """

    def __init__(self, client, clock, balancer: KeyedBalancer,
                 limits: keycache.CacheLimits = keycache.CacheLimits(),
                 addressing: NodeAddressing = NodeAddressing(), max_keys: int = 10000,
                 max_fetches: int = 8, metrics=None, wait_limit: float = 10.0,
                 lookups_per_client: int = 4) -> None:
        self._client = client
        self._clock = clock
        self.balancer = balancer
        self._limits = limits
        self._addressing = addressing
        self._max_keys = max_keys
        self._wait_limit = wait_limit
        self._calls = CallSlots(max_fetches, lookups_per_client)
        self._max_queue = max_fetches * QUEUE_PER_CALL
        self._metrics = metrics
        self._records: OrderedDict[bytes, KeyRecord] = OrderedDict()
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

    def lookup(self, key: bytes, client: str | None = None) -> defer.Deferred:
        """The key's ``KeyRecord`` once its list can be used (it may list no running workload).

        ``client`` is the address asking; without it (the proxy's own use) a
        first lookup is not limited per address. Fails with ``ProxyError``:
        401 when the API refused the key, 502 when the API failed, took too
        long, and nothing recent enough is cached; 429 when ``client`` already
        has ``lookups_per_client`` first lookups under way; 503 when too many
        first lookups wait for a call slot.
        """
        try:
            record = self._record_for(key)
        except ProxyError as busy:
            return defer.fail(busy)
        decision = keycache.decide(record.state, self._clock.seconds(), self._limits)
        self._count("cache", "miss" if decision == keycache.FETCH else "hit")
        if decision != keycache.FETCH:
            return defer.maybeDeferred(self._answer, record, decision)
        first = not keycache.is_known(record.state)
        if first and not record.fetching:
            if client is not None and not self._calls.admits(client):
                return defer.fail(_client_limited_error())
            if self._calls.queued_first() >= self._max_queue:
                return defer.fail(_busy_error())
        waiter: defer.Deferred = defer.Deferred()
        record.waiters.append(waiter)
        self._start_fetch(record, for_client=(client or "") if first else None)
        waiter.addTimeout(self._wait_limit, self._clock)
        waiter.addCallbacks(
            lambda _: self._answer(record, keycache.decide(record.state, self._clock.seconds(), self._limits,
                                                           may_fetch=False)),
            self._waited_too_long)
        return waiter

    def lookup_for(self, key: bytes, found: Callable[[KeyRecord], None],
                   refused: Callable[[ProxyError], None], gone: Callable[[], None], *,
                   client: str) -> Callable[[], None]:
        """``lookup(key, client)`` on behalf of a client: then ``found(record)`` or ``refused(error)``
        (every failure as a ``ProxyError``). ``client`` is its address as forwarding trust reads
        it (``RequestTally.client.origin``). Returns ``leave``, to call when the client goes
        away: ``gone()`` follows unless an answer came first, and no answer comes after it.
        A bug in the callbacks is logged, never left unhandled."""
        settled: list[bool] = []

        def leave() -> None:
            if not settled:
                settled.append(True)
                gone()

        def answer(record) -> None:
            if not settled:
                settled.append(True)
                found(record)

        def refuse(failure) -> None:
            if not settled:
                settled.append(True)
                if not failure.check(ProxyError):
                    log.failure("looking up the workloads of {key} failed", failure, key=key_id(key))
                    failure = Failure(ProxyError(502, "workloads_unavailable", "the workloads API is unavailable"))
                refused(failure.value)

        self.lookup(key, client).addCallbacks(answer, refuse).addErrback(
            lambda failure: log.failure("answering a request for {key} failed", failure, key=key_id(key)))
        return leave

    def pool(self, record: KeyRecord) -> KeyPool:
        """The pool of the key's usable nodes (404 ``ProxyError`` when there are none)."""
        if not record.state.nodes:
            raise ProxyError(404, "no_workloads", "No running workloads found")
        return KeyPool(record.state.nodes, self.balancer)

    def started(self, record: KeyRecord) -> None:
        """A request of this key started (it is not forgotten while in flight): pair with ``finished``."""
        record.in_flight += 1

    def _waited_too_long(self, failure):
        failure.trap(defer.TimeoutError, defer.CancelledError)
        raise ProxyError(502, "workloads_unavailable", "the workloads API did not answer in time")

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
            if len(self._records) >= self._max_keys:
                self._evict_one()
            record = self._records[key] = KeyRecord(key=key, name=key_id(key), state=keycache.KeyState(),
                                                    last_used=now)
        record.last_used = now
        return record

    def _evict_one(self) -> None:
        """Forget one idle key among the least recently used: one without a usable list if
        there is such, else the oldest; 503 ``ProxyError`` when every one looked at is busy."""
        oldest_idle = None
        for scanned, (key, record) in enumerate(self._records.items()):
            if scanned >= EVICTION_SCAN:
                break
            if record.in_flight or record.fetching:
                continue
            if not record.state.nodes:
                oldest_idle = key
                break
            oldest_idle = oldest_idle or key
        if oldest_idle is None:
            raise _busy_error()
        log.debug("forgetting {key}: the cache holds {count} keys", key=self._records[oldest_idle].name,
                  count=self._max_keys)
        del self._records[oldest_idle]

    # -- fetching -------------------------------------------------------------

    def _start_fetch(self, record: KeyRecord, background: bool = False, for_client: str | None = None) -> None:
        """Ask the API for this key unless a call is already under way; never fails.

        ``for_client``: a first lookup of an unknown key, for that address
        (else known work, which goes first). A call for requests, still queued
        when all of them gave up, is not made; a background refresh always is.
        """
        if record.fetching:
            return
        record.fetching = True
        call = self._calls.run(lambda: self._call(record, background), for_client)
        call.addCallbacks(self._fetched, self._fetch_failed, callbackArgs=(record,), errbackArgs=(record,))
        call.addErrback(lambda failure: log.failure("workloads refresh of {key} crashed", failure,
                                                    key=record.name))
        call.addBoth(self._fetch_done, record)

    def _call(self, record: KeyRecord, background: bool) -> defer.Deferred:
        if not background and not any(not waiter.called for waiter in record.waiters):
            return defer.fail(_NobodyWaits())
        return self._client.fetch(record.key)

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
        if failure.check(_NobodyWaits):
            return
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
            if not waiter.called:  # a request that waited too long already has its answer
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
                self._start_fetch(record, background=True)
        self.balancer.prune(frozenset(node.base_url for record in self._records.values()
                                      for node in record.state.nodes))
        if self._metrics is not None:
            self._metrics.cached_keys(len(self._records))

    def _count(self, what: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.workloads_event(what, outcome)

