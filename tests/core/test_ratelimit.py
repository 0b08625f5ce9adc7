"""Per-key token buckets: requests and tokens per minute, the headers, the overrides file's shape."""

import pytest
from twisted.internet.task import Clock

from blyanproxy.core.ratelimit import RateLimit, RateLimiter, parse_overrides


def headers(verdict):
    return {name.decode(): value.decode() for name, value in verdict.headers}


def test_no_limits_allow_everything_without_headers():
    limiter = RateLimiter(RateLimit())
    assert not limiter.active
    verdict = limiter.admit("key-a", 0)
    assert verdict.allowed and verdict.headers == ()


def test_requests_per_minute_refuse_then_refill():
    clock = Clock()
    limiter = RateLimiter(RateLimit(rpm=2))
    assert limiter.admit("key-a", clock.seconds()).allowed
    second = limiter.admit("key-a", clock.seconds())
    assert second.allowed
    assert headers(second)["x-ratelimit-remaining-requests"] == "0"
    assert headers(second)["x-ratelimit-limit-requests"] == "2"
    third = limiter.admit("key-a", clock.seconds())
    assert not third.allowed
    assert third.retry_after == 30
    assert third.error().status == 429 and third.error().code == "rate_limited"
    assert headers(third)["x-ratelimit-reset-requests"] == "1m0s"
    assert limiter.admit("key-b", clock.seconds()).allowed  # another key has its own bucket
    clock.advance(30)
    assert limiter.admit("key-a", clock.seconds()).allowed


def test_tokens_per_minute_charged_after_the_answer():
    clock = Clock()
    limiter = RateLimiter(RateLimit(tpm=100))
    assert limiter.admit("key-a", 0).allowed
    limiter.charge("key-a", 130, 0)
    refused = limiter.admit("key-a", 0)
    assert not refused.allowed
    assert headers(refused)["x-ratelimit-remaining-tokens"] == "0"
    assert refused.retry_after == 19  # 31 tokens to refill at 100/min
    clock.advance(19)
    assert limiter.admit("key-a", clock.seconds()).allowed


def test_overrides_and_bounded_keys():
    limiter = RateLimiter(RateLimit(rpm=1), {"key-vip": RateLimit(rpm=100)}, max_keys=2)
    assert limiter.limit_of("key-vip").rpm == 100
    for _ in range(5):
        assert limiter.admit("key-vip", 0).allowed
    limiter.admit("key-a", 0)
    limiter.admit("key-b", 0)  # key-vip, least recent, is forgotten
    assert limiter.admit("key-vip", 0).allowed


def test_parse_overrides():
    assert parse_overrides({"key-a": {"rpm": 5}}) == {"key-a": RateLimit(rpm=5)}
    assert parse_overrides({"key-a": {"rpm": 5, "tpm": None}}) == {"key-a": RateLimit(rpm=5)}
    for bad in ([], {"key-a": 5}, {"key-a": {"rps": 1}}, {"key-a": {"rpm": 0}}, {"key-a": {"rpm": True}}):
        with pytest.raises(ValueError):
            parse_overrides(bad)
