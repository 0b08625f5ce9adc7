"""A small client of etcd v3's JSON gateway (``/v3/...``), on treq, over HTTP or HTTPS, with or without a login.

Every call has a timeout (a login on the way included); every failure
(refused, timed out, an error answer, a body that is not JSON) is a
``StoreUnavailable`` naming the call, never the values. ``watch`` opens the
streaming ``/v3/watch`` call and hands each newline-delimited JSON message to
a callback.

With ``EtcdAccess.user`` the gateway logs in (``POST /v3/auth/authenticate``
with the user and the password read from ``password_file``) and sends the
token it gets in the ``Authorization`` header of every call. When etcd
answers that the token is no longer valid (401: it expired, or etcd
restarted), the gateway logs in again and makes the call once more; a watch
etcd cancels for that reason is reopened by the store, with a fresh login.
The password is read at each login (a new one needs no restart) and is never
logged nor put in a message.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, cast

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone

from blyanproxy.core import StoreUnavailable
from blyanproxy.twistedinternals import quiet_connection_pool

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.iweb import IResponse

    from blyanproxy.twistedinternals import IOpenSSLTrustRoot

#: A JSON object as etcd's gateway sends and takes it.
Document = dict[str, Any]
#: The headers of one call.
Headers = dict[Any, Any]

#: Longest watch message accepted without a newline (a watch batch of many node changes).
MAX_LINE = 16 * 1024 * 1024


@attrs.frozen
class EtcdAccess:
    """How this process logs in to etcd and whom it trusts (``ETCD_USER``, ``ETCD_PASSWORD_FILE``, ``ETCD_CA_FILE``).

    Without ``user`` calls carry no token. ``trust_root`` replaces the
    system's CA certificates for ``etcd+https``.
    """

    user: str | None = None
    password_file: str | None = None
    trust_root: IOpenSSLTrustRoot | None = attrs.field(default=None, eq=False)


class TokenRefused(StoreUnavailable):
    """etcd answered 401: the login token is not (or no longer) valid."""


class EtcdGateway:
    """Calls to one etcd endpoint; ``close()`` at shutdown."""

    def __init__(self, reactor: IReactorTime, base_url: str, timeout: float,
                 access: EtcdAccess = EtcdAccess()) -> None:
        """``reactor`` times every call out, and connects (``IReactorTCP``)."""
        self._reactor = reactor
        self._base = base_url
        self._timeout = timeout
        self._access = access
        self._pool = quiet_connection_pool(reactor, persistent=True)  # no log line per connection
        self._pool.maxPersistentPerHost = 4
        tls = BrowserLikePolicyForHTTPS(access.trust_root) if access.trust_root else BrowserLikePolicyForHTTPS()
        self._http = HTTPClient(Agent(reactor, contextFactory=tls, connectTimeout=timeout, pool=self._pool))
        self._token: str | None = None
        self._waiting_for_login: list[Deferred[str]] = []

    def call(self, path: str, body: Document) -> Deferred[Document]:
        """POST ``body`` to ``/v3/<path>``; fires with the answer's JSON object."""
        answer = self._authorized(lambda headers: self._post(path, body, headers))
        answer.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_too_slow(path))
        return answer.addErrback(_unavailable, path)

    def watch(self, body: Document, on_message: Callable[[Document], None]) -> WatchStream:
        """Open ``/v3/watch`` with ``body``; ``on_message`` gets every message until the stream ends."""

        def heard(message: Document) -> None:
            if "Unauthenticated" in ((message.get("result") or {}).get("cancel_reason") or ""):
                self._token = None  # the watch is reopened with a fresh login
            on_message(message)

        url = f"{self._base}/v3/watch"
        requested = self._authorized(lambda headers: self._http.post(url, json=body, headers=headers,
                                                                     unbuffered=True))
        return WatchStream(requested, heard, self._reactor, self._timeout)

    def close(self) -> Deferred[None]:
        """Close idle connections to etcd."""
        return self._pool.closeCachedConnections()

    def _post(self, path: str, body: Document, headers: Headers) -> Deferred[Document]:
        def answered(response) -> Deferred[Document]:  # a treq response, whose class treq keeps private
            return response.content().addCallback(lambda raw: _document(path, response.code, raw))

        return self._http.post(f"{self._base}/v3/{path}", json=body, headers=headers,
                               unbuffered=True).addCallback(answered)

    def _authorized(self, send: Callable[[Headers], Deferred[Any]]) -> Deferred[Any]:
        """``send(headers)`` with the login token (logging in first when there is none, and once
        more when etcd refuses the token)."""
        if self._access.user is None:
            return send({})

        def with_token(token: str, may_retry: bool) -> Deferred[Any]:
            def refused(failure: Failure) -> Deferred[Any] | Failure:
                failure.trap(TokenRefused)
                if self._token == token:
                    self._token = None
                return self._token_now().addCallback(with_token, False) if may_retry else failure

            return send({"Authorization": [token]}).addErrback(refused)

        return self._token_now().addCallback(with_token, True)

    def _token_now(self) -> Deferred[str]:
        """The login token: the one held, or the next login's (logins are shared by the calls waiting)."""
        if self._token is not None:
            return succeed(self._token)
        waiter: Deferred[str] = Deferred()
        self._waiting_for_login.append(waiter)
        if len(self._waiting_for_login) == 1:
            self._log_in().addBoth(self._logged_in)
        return waiter

    def _log_in(self) -> Deferred[str]:
        path = self._access.password_file or ""
        try:
            with open(path, encoding="utf-8") as source:
                password = source.read().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            return fail(StoreUnavailable(f"the etcd password file {path} cannot be read ({why})"))
        login = self._post("auth/authenticate", {"name": self._access.user, "password": password}, {})
        login.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_too_slow("auth/authenticate"))
        return login.addCallback(_token_of).addErrback(_unavailable, "auth/authenticate")

    def _logged_in(self, result: str | Failure) -> None:
        if isinstance(result, str):
            self._token = result
        waiting, self._waiting_for_login = self._waiting_for_login, []
        for waiter in waiting:
            if waiter.called:  # its call timed out meanwhile
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class WatchStream:
    """One open watch call; ``ended`` fires (with a ``StoreUnavailable`` failure) when it stops."""

    def __init__(
        self,
        requested: Deferred[IResponse],
        on_message: Callable[[Document], None],
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        """``requested`` is the watch call under way (a login first, perhaps)."""
        self.ended: Deferred[None] = Deferred()
        self._lines: _Lines | None = None
        self._requested = requested
        self._requested.addTimeout(timeout, clock, onTimeoutCancel=_too_slow("watch"))
        self._requested.addCallback(self._opened, on_message)
        self._requested.addErrback(_unavailable, "watch")
        self._requested.addErrback(self._finish)

    def _opened(self, response: IResponse, on_message: Callable[[Document], None]) -> None:
        if response.code != 200:
            raise StoreUnavailable(f"etcd refused the watch (HTTP {response.code})")
        self._lines = _Lines(on_message, self._finish)
        response.deliverBody(self._lines)

    def _finish(self, failure: Failure | StoreUnavailable) -> None:
        if not self.ended.called:
            self.ended.errback(failure)

    def stop(self) -> None:
        """Close the stream (``ended`` then fires)."""
        if self._lines is None:
            self._requested.cancel()
        elif self._lines.transport is not None:
            self._lines.stop()


class _Lines(Protocol):
    """Splits a streamed body into JSON messages, one per line."""

    def __init__(
        self, on_message: Callable[[Document], None], finish: Callable[[StoreUnavailable], None]
    ) -> None:
        self._on_message = on_message
        self._finish = finish
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._on_message(json.loads(line))
        if len(self._buffer) > MAX_LINE:
            self.stop()

    def stop(self) -> None:
        """Stop the body: its connection closes, then ``connectionLost`` ends the watch."""
        # A response body's protocol is connected to an IPushProducer (IResponse.deliverBody),
        # which Twisted's ``Protocol.transport: ITransport`` does not say.
        cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        why = "etcd ended the watch" if reason.check(ResponseDone) else "the watch connection to etcd was lost"
        self._finish(StoreUnavailable(why))


def _document(path: str, code: int, raw: bytes) -> Document:
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if code != 200 or not isinstance(document, dict):
        message = document.get("error") or document.get("message") if isinstance(document, dict) else None
        refusal = TokenRefused if code == 401 else StoreUnavailable
        raise refusal(f"etcd answered {path} with HTTP {code}" + (f": {message}" if message else ""))
    return document


def _token_of(answer: Document) -> str:
    token = answer.get("token")
    if not isinstance(token, str) or not token:
        raise StoreUnavailable("etcd's login answer has no token (is authentication enabled?)")
    return token


def _too_slow(path: str) -> Callable[[object, float], Failure]:
    """What a call cut short by its timeout fails with, whatever the cancelled request reported."""

    def timed_out(result: object, timeout: float) -> Failure:
        return Failure(StoreUnavailable(f"etcd did not answer {path} in time"))

    return timed_out


def _unavailable(failure: Failure, path: str) -> Failure:
    if failure.check(StoreUnavailable):
        return failure
    raise StoreUnavailable(f"etcd is unreachable ({type(failure.value).__name__})")
