"""An in-memory etcd v3 JSON gateway for unit tests, reached over in-memory connections.

``FakeEtcd`` is a twisted.web resource answering the calls ``EtcdStore`` makes
(``kv/range``, ``kv/txn``, ``watch``) from a dict of keys with etcd's
revisions. ``Network`` serves it on a ``MemoryReactorClock``: connections the
code under test opens with ``connectTCP`` are completed to the fake (or
refused while it is ``down``) and their bytes are pumped by ``settle()``, so no
socket is opened and nothing waits for real time.
"""

from __future__ import annotations

import base64
import json

from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

PORT = 2379


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


class FakeEtcd(Resource):
    """The keys, one revision counter, open watches, and switches for misbehaviour.

    ``refusing`` answers every kv call with HTTP 503, ``stalling`` never answers
    one; ``holding_watches`` keeps watch events back until ``release_watches()``.
    A watch starting at an old revision gets the events since, unless that
    revision was compacted away (then it is canceled, as etcd does).
    ``require_login`` turns authentication on: calls without a valid token get
    what etcd answers (401; a watch canceled as Unauthenticated), and
    ``expire_tokens`` makes every token given so far invalid.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.revision = 1
        self.compacted = 0
        self.keys: dict[bytes, dict] = {}  # key -> {"value", "create_revision", "mod_revision"}
        self.calls: list[str] = []
        self.refusing = False
        self.stalling = False
        self.holding_watches = False
        self._history: list[tuple[int, list]] = []  # (revision, events), for watches that start back in time
        self._watches: list[_Watch] = []
        self.users: dict[str, str] = {}  # with a user: authentication is on
        self.tokens: set[str] = set()
        self.logins = 0
        self.authorizations: list[str | None] = []  # the Authorization header of every call but logins

    # -- what a test does to etcd directly ---------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        """Another etcd client puts one key (one revision)."""
        self.revision += 1
        self._put(key, value)
        self._notify([self._event("PUT", key)])

    def delete(self, key: bytes) -> None:
        """Another etcd client deletes one key."""
        self.revision += 1
        self.keys.pop(key)
        self._notify([{"type": "DELETE", "kv": {"key": b64(key), "mod_revision": str(self.revision)}}])

    def compact(self) -> None:
        """Compact the history before the current revision away."""
        self.compacted = self.revision
        self._history = [(revision, events) for revision, events in self._history if revision >= self.compacted]

    def end_watches(self) -> None:
        """etcd ends every open watch (as when it stops)."""
        for watch in list(self._watches):
            watch.end()

    def release_watches(self) -> None:
        """Send the events held back by ``holding_watches``, and hold no more."""
        self.holding_watches = False
        for watch in self._watches:
            watch.flush()

    def require_login(self, user: str, password: str) -> None:
        """Authentication on, with this one user."""
        self.users[user] = password

    def expire_tokens(self) -> None:
        """Every token handed out so far is no longer valid (as after etcd's token TTL, or a restart)."""
        self.tokens.clear()

    def value(self, key: bytes) -> bytes | None:
        entry = self.keys.get(key)
        return entry["value"] if entry else None

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    # -- the gateway ---------------------------------------------------------------------

    def render_POST(self, request):
        path = request.path.decode()
        self.calls.append(path)
        body = json.loads(request.content.read())
        request.setHeader(b"content-type", b"application/json")
        if path == "/v3/auth/authenticate":
            return self._authenticate(request, body)
        if self.users:
            token = request.getHeader(b"authorization")
            self.authorizations.append(token.decode() if token else None)
            if token is None or token.decode() not in self.tokens:
                return self._unauthenticated(request, path)
        if path == "/v3/watch":
            return self._watch(request, body["create_request"])
        if self.stalling:
            return NOT_DONE_YET
        if self.refusing:
            request.setResponseCode(503)
            return json.dumps({"error": "etcdserver: request timed out", "code": 14}).encode()
        answer = {"/v3/kv/range": self._range, "/v3/kv/txn": self._txn}[path](body)
        return json.dumps(answer).encode()

    def _authenticate(self, request, body: dict) -> bytes:
        if not self.users or self.users.get(body.get("name")) != body.get("password"):
            request.setResponseCode(400)
            reason = ("etcdserver: authentication is not enabled" if not self.users
                      else "etcdserver: authentication failed, invalid user ID or password")
            return json.dumps({"error": reason, "message": reason, "code": 3}).encode()
        self.logins += 1
        token = f"token-{self.logins}.{self.revision}"
        self.tokens.add(token)
        return json.dumps({"header": self._header(), "token": token}).encode()

    def _unauthenticated(self, request, path: str) -> bytes:
        reason = "etcdserver: invalid auth token"
        if path == "/v3/watch":  # the gateway answers 200 and cancels the watch at once
            return json.dumps({"result": {"header": self._header(), "watch_id": "-1", "created": True,
                                          "canceled": True, "cancel_reason":
                                          f"rpc error: code = Unauthenticated desc = {reason}"}}).encode() + b"\n"
        request.setResponseCode(401)
        return json.dumps({"error": reason, "message": reason, "code": 16}).encode()

    def _header(self) -> dict:
        return {"cluster_id": "1", "member_id": "1", "revision": str(self.revision), "raft_term": "2"}

    def _kv(self, key: bytes) -> dict:
        entry = self.keys[key]
        return {"key": b64(key), "value": b64(entry["value"]), "create_revision": str(entry["create_revision"]),
                "mod_revision": str(entry["mod_revision"]), "version": "1"}

    def _event(self, kind: str, key: bytes) -> dict:
        event = {"kv": self._kv(key)}
        if kind != "PUT":  # the gateway leaves out the enum's default, PUT
            event["type"] = kind
        return event

    def _in_range(self, key: bytes, request: dict) -> bool:
        start = unb64(request["key"])
        end = unb64(request.get("range_end", ""))
        return start <= key < end if end else key == start

    def _range(self, request: dict) -> dict:
        kvs = [self._kv(key) for key in sorted(self.keys) if self._in_range(key, request)]
        return {"header": self._header(), "kvs": kvs, "count": str(len(kvs))}

    def _put(self, key: bytes, value: bytes) -> None:
        created = self.keys[key]["create_revision"] if key in self.keys else self.revision
        self.keys[key] = {"value": value, "create_revision": created, "mod_revision": self.revision}

    def _txn(self, body: dict) -> dict:
        held = all(
            (self.keys[unb64(c["key"])]["mod_revision"] if unb64(c["key"]) in self.keys else 0)
            == int(c["mod_revision"])
            for c in body["compare"]
        )
        if not held:
            responses = [{"response_range": self._range(op["request_range"])} for op in body["failure"]]
            return {"header": self._header(), "succeeded": False, "responses": responses}
        self.revision += 1
        events = []
        for operation in body["success"]:
            if "request_put" in operation:
                key = unb64(operation["request_put"]["key"])
                self._put(key, unb64(operation["request_put"]["value"]))
                events.append(self._event("PUT", key))
            else:
                key = unb64(operation["request_delete_range"]["key"])
                if self.keys.pop(key, None) is not None:
                    events.append({"type": "DELETE", "kv": {"key": b64(key), "mod_revision": str(self.revision)}})
        self._notify(events)
        return {"header": self._header(), "succeeded": True, "responses": [{} for _ in body["success"]]}

    def _watch(self, request, create: dict):
        request.setHeader(b"content-type", b"application/json")
        start = int(create.get("start_revision", "0"))
        watch = _Watch(self, request, create)
        if start and start < self.compacted:
            watch.send({"result": {"header": self._header(), "canceled": True,
                                   "compact_revision": str(self.compacted)}})
            watch.end()
            return NOT_DONE_YET
        self._watches.append(watch)
        request.notifyFinish().addBoth(lambda _: watch in self._watches and self._watches.remove(watch))
        watch.send({"result": {"header": self._header(), "created": True}})
        for revision, events in self._history:
            if start and revision >= start:
                watch.queue(events)
        watch.flush()
        return NOT_DONE_YET

    def _notify(self, events: list) -> None:
        self._history.append((self.revision, events))
        for watch in self._watches:
            watch.queue(events)
            if not self.holding_watches:
                watch.flush()


class _Watch:
    """One open watch response."""

    def __init__(self, etcd: FakeEtcd, request, create: dict) -> None:
        self._etcd = etcd
        self._request = request
        self._create = create
        self._pending: list[dict] = []

    def queue(self, events: list) -> None:
        self._pending += [event for event in events if self._etcd._in_range(unb64(event["kv"]["key"]),
                                                                                  self._create)]

    def flush(self) -> None:
        if self._pending:
            events, self._pending = self._pending, []
            self.send({"result": {"header": self._etcd._header(), "events": events}})

    def send(self, message: dict) -> None:
        self._request.write(json.dumps(message).encode() + b"\n")

    def end(self) -> None:
        if self in self._etcd._watches:
            self._etcd._watches.remove(self)
        self._request.finish()


class Network:
    """Serves ``etcd`` on port 2379 of a ``MemoryReactorClock``; ``down`` refuses new connections."""

    def __init__(self, reactor, etcd: FakeEtcd) -> None:
        self.reactor = reactor
        self.etcd = etcd
        self.down = False
        self._completer = ConnectionCompleter(reactor)
        self._pumps: list = []
        reactor.listenTCP(PORT, Site(etcd, reactor=reactor))

    def settle(self) -> None:
        """Run what is due now, complete or refuse pending connections and move bytes, until nothing moves."""
        for _ in range(1000):
            now = self.reactor.seconds()
            moved = any(call.getTime() <= now for call in self.reactor.getDelayedCalls())
            self.reactor.advance(0)
            while self.reactor.tcpClients:
                moved = True
                if self.down:
                    self._completer.failOnce(Failure(ConnectionRefusedError()))
                else:
                    self._pumps.append(self._completer.succeedOnce())
            for pump in self._pumps:
                moved = pump.pump() or moved
            if not moved:
                return
        raise AssertionError("the connections never settled")

    def stop(self) -> None:
        """etcd goes away: open connections are cut and new ones refused (``start()`` brings it back)."""
        self.down = True
        for pump in self._pumps:
            pump.serverIO.loseConnection()
        self.settle()

    def start(self) -> None:
        """etcd answers again."""
        self.down = False

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the clock, then settle."""
        self.reactor.advance(seconds)
        self.settle()
