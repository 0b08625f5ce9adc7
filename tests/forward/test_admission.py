"""The data path's admission: who the caller is, its rate limits and headers, its token totals."""

import types

import pytest
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.core import ProxyError, RateLimit, RateLimiter
from blyanproxy.discovery import key_id
from blyanproxy.fleet import SlotQueue
from blyanproxy.forward import AccessRecord, Admission
from blyanproxy.forward.admission import caller_of


def request(**headers):
    made = DummyRequest([b"v1"])
    for name, value in headers.items():
        made.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return made


def tally():
    return types.SimpleNamespace(client=types.SimpleNamespace(origin="10.1.2.3"), caller=None)


def test_the_caller_is_the_configured_header_then_the_key_then_the_address():
    assert caller_of(request(), tally()).key == "10.1.2.3"
    assert caller_of(request(authorization="Bearer sk-1"), tally()).key == key_id(b"sk-1")
    assert caller_of(request(x_c3_api_key="c3-key"), tally()).key == key_id(b"c3-key")
    assert caller_of(request(authorization="Bearer \x01bad"), tally()).key == "10.1.2.3"
    named = request(x_team="blue", authorization="Bearer sk-1")
    assert caller_of(named, tally(), b"x-team").key == key_id(b"blue")
    assert caller_of(request(authorization="Bearer sk-1"), tally(), b"x-team").key == key_id(b"sk-1")
    assert caller_of(request(x_priority="HIGH"), tally()).band == "high"


def record(caller, tokens_in, tokens_out):
    return AccessRecord(method="POST", target=b"/v1/chat/completions", status=200, node="n", attempts=1, ttfb=0.1,
                        duration=0.2, bytes_in=1, bytes_out=1, ended="complete", client="10.1.2.3", caller=caller,
                        tokens_in=tokens_in, tokens_out=tokens_out)


def test_limits_headers_refusal_and_token_totals():
    clock = Clock()
    admission = Admission(clock, SlotQueue(clock, 10, 5.0), RateLimiter(RateLimit(rpm=60, tpm=100)))
    first = request(authorization="Bearer sk-1")
    caller = admission.admit(first, tally())
    assert first.responseHeaders.getRawHeaders(b"x-ratelimit-remaining-requests") == [b"59"]
    admission.finished(record(caller.key, 40, 80))
    refused = request(authorization="Bearer sk-1")
    with pytest.raises(ProxyError) as raised:
        admission.admit(refused, tally())
    assert raised.value.status == 429 and raised.value.code == "rate_limited"
    assert raised.value.retry_after == 13  # 21 tokens to refill at 100 a minute
    assert refused.responseHeaders.getRawHeaders(b"x-ratelimit-remaining-tokens") == [b"0"]
    view = admission.view()
    assert view["callers"][caller.key] == {"requests": 2, "rate_limited": 1, "tokens_in": 40, "tokens_out": 80,
                                           "limit": {"rpm": 60, "tpm": 100}}
    assert "sk-1" not in repr(view)
