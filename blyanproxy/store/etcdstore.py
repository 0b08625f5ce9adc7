"""The ``StateStore`` in etcd: several proxy processes share one fleet.

The store keeps a mirror of the keys under its prefix with the revision it
reflects (``etcdkeys`` describes the layout and the write protocol). It runs
as a service:

- **Start-up.** Until etcd has answered once, the process serves the declared
  nodes (``NODE_<n>``, ``--node``) and refuses admin writes with 503. When etcd
  answers, the declared nodes are merged into the fleet it holds (the same
  rule as the state file's, ``state.merge``), written back, applied, and the
  watch starts. If etcd is down at start-up this is retried every
  ``RETRY_DELAY`` seconds, with one log line, not one per attempt.
- **Watch.** One streaming watch on the prefix from the mirror's revision + 1;
  every change from another process is applied to this one's registry and
  balancer as it arrives (a process's own change, echoed back, changes
  nothing). When the watch breaks (etcd stopped, connection lost) traffic goes
  on with the fleet as last known and the watch is reopened every
  ``RETRY_DELAY`` seconds from the same revision, so nothing in between is
  missed; if etcd compacted that revision away, the whole prefix is read again.
- **Writes** (``commit``) are one transaction each, with the etcd timeout;
  etcd down or slow means ``StoreUnavailable`` and nothing changes here.
- **Bad keys.** Every value read is checked as admin input is
  (``etcdkeys.state_from_keys``). A key that breaks a rule (a node whose name
  has a line break, an unknown policy, a value that is not JSON) is never
  applied: it is skipped with an error line naming it (once per version of
  the key) and the rest of the fleet is applied. This process's writes leave
  such a key alone (another version of the proxy may have written it): mend
  or delete it with ``etcdctl``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail

from blyanproxy.core import FleetState, Node, StoreConflict, StoreUnavailable, merge
from blyanproxy.logs import logger
from blyanproxy.store.etcdclient import EtcdAccess, EtcdGateway, WatchStream
from blyanproxy.store.etcdkeys import (
    CHANGED,
    KeyValue,
    apply_events,
    b64,
    kvs_from_range,
    range_end,
    shown_key,
    state_from_keys,
    state_keys,
    unb64,
    write_operations,
)
from blyanproxy.store.storeurl import EtcdLocation

log = logger("etcd")

#: Seconds between attempts to reach etcd again (first read, watch).
RETRY_DELAY = 0.5
#: Lost races tolerated while merging the declared nodes at start-up.
SYNC_ATTEMPTS = 5


def _nobody(state: FleetState) -> None:
    """No watcher yet."""


class EtcdStore(Service):
    """The ``StateStore`` under one etcd prefix; the watcher is called with every state to apply."""

    def __init__(self, reactor, location: EtcdLocation, timeout: float, declared: Iterable[Node],
                 identity: str, access: EtcdAccess | None = None) -> None:
        """``access``: the login and the CA certificates for etcd (``etcdclient.EtcdAccess``; none: neither)."""
        self._reactor = reactor
        self._location = location
        self._prefix = location.prefix
        self._lock = location.prefix + CHANGED.encode()
        self._gateway = EtcdGateway(reactor, location.base_url, timeout, access or EtcdAccess())
        self._declared = tuple(declared)
        self._identity = identity
        self._on_change: Callable[[FleetState], None] = _nobody
        self._kvs: dict[bytes, KeyValue] = {}
        self._revision = 0
        self._ready = False  # True once etcd answered and the declared nodes are merged in
        self._reachable = True  # for logging each outage once
        self._stream: WatchStream | None = None
        self._compacted = False
        self._cancel_reason: str | None = None
        self._retry = None
        self._skipped: dict[bytes, int] = {}  # keys left out of the fleet, with the revision told of

    def load(self) -> FleetState | None:
        """Nothing at once: the fleet arrives through the watcher once etcd has answered."""
        return None

    def watch(self, on_change: Callable[[FleetState], None]) -> None:
        """Call ``on_change`` with the fleet each time etcd's copy changes."""
        self._on_change = on_change

    def flush(self, state: FleetState) -> None:
        """Nothing to write: every change was committed as it was made."""

    def state(self) -> FleetState | None:
        """The fleet as etcd held it at the mirror's revision (``None``: nothing stored yet).

        Keys that break a rule are left out, each logged once per version.
        """
        skipped: dict[bytes, int] = {}

        def skip(key: bytes, problem: str) -> None:
            revision = skipped[key] = self._kvs[key].mod_revision
            if self._skipped.get(key) != revision:
                log.error("etcd key {key} skipped, not applied: {problem}", key=shown_key(key), problem=problem)

        state = state_from_keys(self._kvs, self._prefix, skip)
        self._skipped = skipped
        return state

    # -- writes -------------------------------------------------------------------

    def commit(self, wanted: FleetState) -> Deferred:
        """Make etcd hold ``wanted``; fires with the fleet to apply (see ``FleetKeeper.edit``)."""
        if not self._ready:
            return fail(StoreUnavailable(f"not yet in step with etcd at {self._location.base_url}"))
        return self._write(wanted)

    def _write(self, wanted: FleetState) -> Deferred:
        self.state()  # which keys are skipped now: they are left alone
        held = {key: kv for key, kv in self._kvs.items() if key != self._lock and key not in self._skipped}
        operations = write_operations(held, state_keys(wanted, self._prefix), self._lock)
        stamp = json.dumps({"by": self._identity, "at": self._reactor.seconds()}).encode()
        operations.append({"request_put": {"key": b64(self._lock), "value": b64(stamp)}})
        known = self._kvs.get(self._lock)
        body = {
            "compare": [{"key": b64(self._lock), "target": "MOD", "result": "EQUAL",
                         "mod_revision": str(known.mod_revision if known else 0)}],
            "success": operations,
            "failure": [{"request_range": {"key": b64(self._prefix), "range_end": b64(range_end(self._prefix))}}],
        }
        return self._gateway.call("kv/txn", body).addCallback(self._written, operations)

    def _written(self, answer: dict, operations: list) -> FleetState:
        revision = int(answer["header"]["revision"])
        if not answer.get("succeeded"):
            fresh = answer["responses"][0]["response_range"]
            self._replace(kvs_from_range(fresh), revision)
            raise StoreConflict(self.state() or FleetState())
        if revision > self._revision:  # not yet seen through the watch: fold our own write in
            for operation in operations:
                if "request_put" in operation:
                    put = operation["request_put"]
                    key, value = unb64(put["key"]), unb64(put["value"])
                    created = self._kvs[key].create_revision if key in self._kvs else revision
                    self._kvs[key] = KeyValue(value, created, revision)
                else:
                    self._kvs.pop(unb64(operation["request_delete_range"]["key"]), None)
            self._revision = revision
        return self.state() or FleetState()

    def _replace(self, kvs: dict[bytes, KeyValue], revision: int) -> None:
        self._kvs = kvs
        self._revision = revision

    # -- reading and watching -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._sync()

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._stream is not None:
            self._stream.stop()
        return self._gateway.close()

    def _read_all(self) -> Deferred:
        body = {"key": b64(self._prefix), "range_end": b64(range_end(self._prefix))}

        def read(answer):
            self._replace(kvs_from_range(answer), int(answer["header"]["revision"]))

        return self._gateway.call("kv/range", body).addCallback(read)

    def _sync(self) -> None:
        """First contact: read everything, merge the declared nodes in, write, apply, watch."""

        def merge_in(_, attempts=SYNC_ATTEMPTS):
            def lost_race(failure):
                failure.trap(StoreConflict)
                return failure if attempts <= 1 else merge_in(None, attempts - 1)

            return self._write(merge(self._declared, self.state())).addErrback(lost_race)

        def done(state):
            self._ready = True
            log.info("fleet in step with etcd at {url} (revision {revision}, {count} node(s))",
                     url=self._location.base_url, revision=self._revision, count=len(state.nodes))
            self._reachable = True
            self._on_change(state)
            self._watch()

        def failed(failure):
            self._outage("could not read the fleet from etcd", failure.getErrorMessage())
            self._later(self._sync)

        read = self._read_all().addCallback(merge_in)
        read.addCallbacks(done, failed)
        read.addErrback(lambda failure: log.failure("applying the fleet from etcd failed", failure))

    def _watch(self) -> None:
        if not self.running:
            return
        body = {"create_request": {"key": b64(self._prefix), "range_end": b64(range_end(self._prefix)),
                                   "start_revision": str(self._revision + 1)}}
        self._stream = self._gateway.watch(body, self._on_message)
        self._stream.ended.addErrback(self._watch_ended)

    def _on_message(self, message: dict) -> None:
        result = message.get("result") or {}
        if result.get("created") and not result.get("canceled") and not self._reachable:
            log.info("watching etcd again from revision {revision}", revision=self._revision + 1)
            self._reachable = True
        if result.get("canceled"):
            self._compacted = bool(result.get("compact_revision"))
            self._cancel_reason = result.get("cancel_reason") or None  # a refused login, a denied range
            if self._stream is not None:
                self._stream.stop()
            return
        events = result.get("events") or []
        if events and apply_events(self._kvs, events, self._revision):
            self._revision = max(int(event["kv"]["mod_revision"]) for event in events)
            self._publish()

    def _publish(self) -> None:
        self._on_change(self.state() or FleetState())

    def _watch_ended(self, failure) -> None:
        self._stream = None
        if not self.running:
            return
        if self._compacted:
            self._compacted = False
            log.warn("etcd compacted revision {revision}; reading the whole fleet again",
                     revision=self._revision + 1)
            self._later(self._reload)
            return
        why, self._cancel_reason = self._cancel_reason or failure.getErrorMessage(), None
        self._outage("the etcd watch stopped; the last known fleet keeps serving", why)
        self._later(self._watch)

    def _reload(self) -> None:
        def read(_):
            self._publish()
            self._watch()

        def failed(failure):
            self._outage("could not read the fleet from etcd", failure.getErrorMessage())
            self._later(self._reload)

        self._read_all().addCallbacks(read, failed)

    def _outage(self, what: str, why: str) -> None:
        if self._reachable:
            self._reachable = False
            log.warn("{what} ({why}); retrying every {delay:g} s", what=what, why=why, delay=RETRY_DELAY)

    def _later(self, action) -> None:
        if self.running:
            self._retry = self._reactor.callLater(RETRY_DELAY, action)

