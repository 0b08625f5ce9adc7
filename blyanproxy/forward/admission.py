"""Admission on the data path: who the caller is, its rate limits, its token usage.

``Admission`` is built once by ``tap`` (with ``QUEUE_MAX``, ``QUEUE_TIMEOUT_MS``
and the rate-limit settings). ``admit`` runs before a request is forwarded:
it names the caller (the c3 key or Bearer token as its short hash, else the
client address; a configured header first; the band from ``X-Priority``), and refuses it 429
``rate_limited`` with OpenAI-style ``x-ratelimit-*`` headers when over a
limit. ``finished`` (a listener of the end-of-request hook) charges the
tokens an answer reported to its caller and keeps the per-key totals the
admin API shows.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from blyanproxy.core import ProxyError, RateLimiter, parse_priority
from blyanproxy.discovery import api_key_of, key_id
from blyanproxy.fleet import Caller, SlotQueue
from blyanproxy.forward.traffic import AccessRecord, RequestTally

#: At most this many callers' token totals are kept (the least recently seen goes first).
MAX_CALLERS = 1000


def caller_of(request: Request, tally: RequestTally, key_header: bytes | None = None) -> Caller:
    """Who ``request`` is for the queue and the limits (see the module docstring); ``key_header``
    (``CALLER_KEY_HEADER``), when the request has it, names the caller before its API key."""
    headers = request.requestHeaders
    named = headers.getRawHeaders(key_header) if key_header is not None else None
    if named and named[0].strip():
        key: bytes | None = named[0].strip()
    else:
        try:
            key = api_key_of(headers)
        except ProxyError:
            key = None
    name = key_id(key) if key is not None else tally.client.origin
    values = request.requestHeaders.getRawHeaders(b"x-priority")
    return Caller(name, parse_priority(values[0] if values else None))


@attrs.define
class CallerUsage:
    """One caller's totals: requests, refusals, prompt and completion tokens."""

    requests: int = 0
    rate_limited: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


class Admission:
    """The queue for node slots (``QUEUE_MAX`` 0: every request that finds its nodes at their cap is
    refused ``queue_full``) and the per-key rate limiter."""

    def __init__(self, clock: IReactorTime, queue: SlotQueue, limiter: RateLimiter,
                 key_header: bytes | None = None) -> None:
        self._clock = clock
        self._key_header = key_header
        self.queue = queue
        self.limiter = limiter
        self._usage: OrderedDict[str, CallerUsage] = OrderedDict()

    def admit(self, request: Request, tally: RequestTally) -> Caller:
        """Name the request's caller and apply its rate limits; raises the 429 when over one.

        The ``x-ratelimit-*`` headers go on the answer either way.
        """
        caller = caller_of(request, tally, self._key_header)
        tally.caller = caller.key
        usage = self._usage_of(caller.key)
        usage.requests += 1
        limiter = self.limiter
        if limiter.active:
            verdict = limiter.admit(caller.key, self._clock.seconds())
            for name, value in verdict.headers:
                request.responseHeaders.setRawHeaders(name, [value])
            if not verdict.allowed:
                usage.rate_limited += 1
                if self.queue.observer is not None:
                    self.queue.observer.queue_rejected("rate_limited")
                raise verdict.error()
        return caller

    def finished(self, record: AccessRecord) -> None:
        """A request ended: charge its tokens to its caller (a listener of the end-of-request hook)."""
        if record.caller is None or (record.tokens_in is None and record.tokens_out is None):
            return
        used_in, used_out = record.tokens_in or 0, record.tokens_out or 0
        usage = self._usage_of(record.caller)
        usage.tokens_in += used_in
        usage.tokens_out += used_out
        self.limiter.charge(record.caller, used_in + used_out, self._clock.seconds())

    def _usage_of(self, caller: str) -> CallerUsage:
        usage = self._usage.get(caller)
        if usage is None:
            usage = self._usage[caller] = CallerUsage()
            if len(self._usage) > MAX_CALLERS:
                self._usage.popitem(last=False)
        else:
            self._usage.move_to_end(caller)
        return usage

    def view(self) -> dict[str, Any]:
        """The admin API's view: the queue and each caller's totals (keys by their hash only)."""
        queue = self.queue
        limiter = self.limiter
        return {
            "queue": {
                "depth": len(queue), "byBand": queue.depth_by_band(), "max": queue.limit,
                "timeoutSeconds": queue.timeout,
            },
            "rateLimit": {"rpm": limiter.default.rpm, "tpm": limiter.default.tpm,
                          "overrides": len(limiter.overrides)},
            "callers": {
                name: {**attrs.asdict(usage), "limit": attrs.asdict(limiter.limit_of(name))}
                for name, usage in self._usage.items()
            },
        }
