"""The workloads API client: one key's workloads, ``POST {API_URL}/workloads``.

Every call is bounded: a timeout covers connecting, the answer and its body,
and the body is capped. Redirects are not followed, so the caller's key is
only ever sent to ``API_URL``. The key travels in ``X-C3-API-KEY``; it is
never logged and never part of an error.
"""

from __future__ import annotations

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from blyanproxy.discovery.workloads import WorkloadsFormatError, parse_workloads
from blyanproxy.twistedinternals import quiet_connection_pool
from blyanproxy.upstream import BodyTooLarge, read_capped

#: Largest workloads answer read (a key with thousands of workloads fits easily).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
_REQUEST_BODY = b'{"running": true}'


class KeyRefused(Exception):
    """The API refused the key (401 or 403)."""


class WorkloadsUnavailable(Exception):
    """The API could not answer: unreachable, timed out, an error status or a malformed answer."""


def workloads_client(reactor, api_url: str, timeout: float, trust_root=None) -> WorkloadsClient:
    """A client for ``api_url``: kept-alive connections, TLS verified (system roots or ``trust_root``).

    Its pool opens and closes connections without a log line for each."""
    pool = quiet_connection_pool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
                  connectTimeout=timeout, pool=pool)
    return WorkloadsClient(HTTPClient(agent), api_url, timeout, reactor, pool)


class WorkloadsClient:
    """Asks the API for one key's workloads (``fetch``).

    ``http`` is a treq ``HTTPClient``; ``api_url`` the API's base URL (the
    client appends ``/workloads``).
    """

    def __init__(self, http: HTTPClient, api_url: str, timeout: float, clock,
                 pool: HTTPConnectionPool | None = None) -> None:
        self._http = http
        self._url = api_url.rstrip("/") + "/workloads"
        self._timeout = timeout
        self._clock = clock
        self._pool = pool

    def close(self) -> defer.Deferred:
        """Close the kept-alive connections to the API (those of ``pool``)."""
        return self._pool.closeCachedConnections() if self._pool is not None else defer.succeed(None)

    def fetch(self, key: bytes) -> defer.Deferred:
        """The key's workloads (a tuple of ``Workload``), or a failure with ``KeyRefused`` or
        ``WorkloadsUnavailable`` (its message says why, without the key)."""
        headers: dict[bytes | str, list[bytes | str]] = {
            b"X-C3-API-KEY": [key],
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
        }
        answer = self._http.post(self._url, data=_REQUEST_BODY, headers=headers, allow_redirects=False)
        answer.addCallback(self._read)
        answer.addTimeout(self._timeout, self._clock)
        answer.addErrback(self._explain)
        return answer

    def _discard(self, response) -> None:
        """Read and drop an error answer's body (bounded in size and time), keeping the connection."""
        read_capped(response, MAX_ANSWER_BYTES, keep=False).addTimeout(self._timeout, self._clock).addErrback(
            lambda _: None)

    def _read(self, response) -> defer.Deferred:
        if response.code in (401, 403):
            self._discard(response)
            raise KeyRefused(f"the workloads API refused the key ({response.code})")
        if response.code != 200:
            self._discard(response)
            raise WorkloadsUnavailable(f"the workloads API answered {response.code}")
        return read_capped(response, MAX_ANSWER_BYTES).addCallback(parse_workloads)

    def _explain(self, failure):
        if failure.check(KeyRefused, WorkloadsUnavailable):
            return failure
        if failure.check(defer.TimeoutError):
            raise WorkloadsUnavailable(f"the workloads API did not answer within {self._timeout:g} s")
        if failure.check(WorkloadsFormatError):
            raise WorkloadsUnavailable(f"the workloads API's answer is malformed: {failure.value}")
        if failure.check(BodyTooLarge):
            raise WorkloadsUnavailable(f"the workloads API's answer is over {MAX_ANSWER_BYTES} bytes")
        raise WorkloadsUnavailable(f"the workloads API is unreachable ({failure.type.__name__})")
