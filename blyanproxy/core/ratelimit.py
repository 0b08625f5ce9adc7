"""Per-key rate limits: requests and tokens per minute, as token buckets, with OpenAI-style headers.

Each caller key (its short hash: keys are never held here) has a bucket per
limit, full at the limit and refilled evenly over a minute. A request takes
one request token; tokens used are charged when its answer ends (``charge``),
so the token bucket may go below zero and then refuses until it refills. No
clock here: the caller passes ``now``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import attrs

from blyanproxy.core.errors import ProxyError


@attrs.frozen
class RateLimit:
    """Limits for one key: ``rpm`` requests and ``tpm`` tokens per minute (None: no limit)."""

    rpm: int | None = None
    tpm: int | None = None

    @property
    def unlimited(self) -> bool:
        """Whether neither limit is set."""
        return self.rpm is None and self.tpm is None


@attrs.define
class _Bucket:
    level: float
    at: float

    def refill(self, limit: int, now: float) -> None:
        self.level = min(float(limit), self.level + (now - self.at) * limit / 60.0)
        self.at = now


def _duration(seconds: float) -> str:
    """A reset time as OpenAI writes it (``1s``, ``6m0s``, ``0.5s``)."""
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def _header_names(kind: bytes) -> tuple[bytes, bytes, bytes]:
    return b"x-ratelimit-limit-" + kind, b"x-ratelimit-remaining-" + kind, b"x-ratelimit-reset-" + kind


#: The ``x-ratelimit-*`` header names, as OpenAI names them, for requests and for tokens.
_REQUEST_HEADERS = _header_names(b"requests")
_TOKEN_HEADERS = _header_names(b"tokens")


@attrs.frozen
class Verdict:
    """What ``RateLimiter.admit`` decided: ``allowed``, the ``headers`` to send, ``retry_after`` seconds."""

    allowed: bool
    headers: tuple[tuple[bytes, bytes], ...]
    retry_after: int = 0

    def error(self) -> ProxyError:
        """The 429 for a refused request."""
        return ProxyError(429, "rate_limited", "the caller's rate limit is reached", retry_after=self.retry_after)


class RateLimiter:
    """Token buckets per key hash, with ``default`` limits and per-key ``overrides`` (replaceable).

    At most ``max_keys`` keys are remembered (the least recently seen goes
    first: it then starts again with full buckets).
    """

    def __init__(self, default: RateLimit, overrides: Mapping[str, RateLimit] | None = None,
                 max_keys: int = 10000) -> None:
        self.default = default
        self.overrides: Mapping[str, RateLimit] = dict(overrides or {})
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[_Bucket, _Bucket]] = OrderedDict()

    @property
    def active(self) -> bool:
        """Whether any limit is set at all (else ``admit`` always allows, with no headers)."""
        return not self.default.unlimited or any(not limit.unlimited for limit in self.overrides.values())

    def limit_of(self, key: str) -> RateLimit:
        """The limits that hold for ``key``."""
        return self.overrides.get(key, self.default)

    def _buckets_of(self, key: str, limit: RateLimit, now: float) -> tuple[_Bucket, _Bucket]:
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = (_Bucket(float(limit.rpm or 0), now), _Bucket(float(limit.tpm or 0), now))
            self._buckets[key] = buckets
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if limit.rpm is not None:
            buckets[0].refill(limit.rpm, now)
        if limit.tpm is not None:
            buckets[1].refill(limit.tpm, now)
        return buckets

    def admit(self, key: str, now: float) -> Verdict:
        """Take one request for ``key`` now, or refuse it (nothing is taken then)."""
        limit = self.limit_of(key)
        if limit.unlimited:
            return Verdict(True, ())
        requests, tokens = self._buckets_of(key, limit, now)
        wait = 0.0
        if limit.rpm is not None and requests.level < 1:
            wait = max(wait, (1 - requests.level) * 60.0 / limit.rpm)
        if limit.tpm is not None and tokens.level <= 0:
            wait = max(wait, (1 - tokens.level) * 60.0 / limit.tpm)
        allowed = wait == 0.0
        if allowed and limit.rpm is not None:
            requests.level -= 1
        return Verdict(allowed, self._headers(limit, requests, tokens), max(1, math.ceil(wait)) if not allowed else 0)

    def charge(self, key: str, used: int, now: float) -> None:
        """``used`` tokens were spent by one of ``key``'s requests."""
        limit = self.limit_of(key)
        if limit.tpm is not None and used > 0:
            self._buckets_of(key, limit, now)[1].level -= used

    @staticmethod
    def _headers(limit: RateLimit, requests: _Bucket, tokens: _Bucket) -> tuple[tuple[bytes, bytes], ...]:
        headers: list[tuple[bytes, bytes]] = []
        for (limit_name, remaining_name, reset_name), value, bucket in (
            (_REQUEST_HEADERS, limit.rpm, requests), (_TOKEN_HEADERS, limit.tpm, tokens)
        ):
            if value is not None:
                headers += [
                    (limit_name, b"%d" % value),
                    (remaining_name, b"%d" % max(0, math.floor(bucket.level))),
                    (reset_name, _duration((value - bucket.level) * 60.0 / value).encode()),
                ]
        return tuple(headers)


def parse_overrides(data: object) -> dict[str, RateLimit]:
    """Per-key limits from the overrides file's JSON: ``{"key-…": {"rpm": 60, "tpm": 100000}}``.

    Raises ``ValueError`` naming what is wrong.
    """
    if not isinstance(data, dict):
        raise ValueError("the rate-limit overrides must be a JSON object of key hash to limits")
    limits = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - {"rpm", "tpm"}:
            raise ValueError(f"limits for {key} must be an object with rpm and/or tpm")
        values = {}
        for name in ("rpm", "tpm"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} for {key} must be a positive integer or null")
            values[name] = value
        limits[str(key)] = RateLimit(**values)
    return limits
