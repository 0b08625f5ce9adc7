"""The admin token: how a request presents it, how it is compared, where it comes from, and the failure throttle."""

import os

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from blyanproxy.admin import FailureThrottle, load_or_create_token, presented_token, token_matches
from blyanproxy.core import parse_forward_trust

TOKEN = "admin-token-for-tests-0123456789"


def request_with(**headers):
    request = DummyRequest([b"status"])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    return request


@pytest.mark.parametrize(
    "headers, presented",
    [
        ({"X_Admin_Token": b"abc"}, b"abc"),
        ({"X_Admin_Token": b"  abc  "}, b"abc"),
        ({"Authorization": b"Bearer abc"}, b"abc"),
        ({"Authorization": b"bearer  abc "}, b"abc"),
        ({"X_Admin_Token": b"first", "Authorization": b"Bearer second"}, b"first"),
        ({"Authorization": b"Basic YWxhZGRpbjpvcGVuc2VzYW1l"}, None),
        ({"Authorization": b"Bearer "}, None),
        ({"Authorization": b"Bearer"}, None),
        ({"X_Admin_Token": b""}, None),
        ({}, None),
    ],
)
def test_the_token_comes_from_x_admin_token_or_a_bearer_credential(headers, presented):
    assert presented_token(request_with(**headers)) == presented


@pytest.mark.parametrize(
    "presented, matches",
    [
        (TOKEN.encode(), True),
        (TOKEN.encode() + b"x", False),
        (TOKEN.encode()[:-1], False),
        (TOKEN.upper().encode(), False),
        (b"", False),
        (None, False),
    ],
)
def test_only_the_exact_token_matches(presented, matches):
    assert token_matches(presented, TOKEN) is matches


def test_a_throttle_refuses_an_address_after_the_limit_until_the_window_passes():
    clock = Clock()
    throttle = FailureThrottle(clock, limit=3, window=60.0)
    for _ in range(2):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") is None
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 60
    assert throttle.retry_after("10.0.0.2") is None  # addresses are counted apart
    clock.advance(45)
    assert throttle.retry_after("10.0.0.1") == 15
    clock.advance(14.5)
    assert throttle.retry_after("10.0.0.1") == 1  # never "retry in 0 s" while still refused
    clock.advance(0.5)
    assert throttle.retry_after("10.0.0.1") is None


def test_only_failures_within_the_window_count():
    clock = Clock()
    throttle = FailureThrottle(clock, limit=3, window=10.0)
    throttle.failed("a")
    throttle.failed("a")
    clock.advance(10)
    throttle.failed("a")
    assert throttle.retry_after("a") is None  # the first two are 10 s old: out of the window
    clock.advance(5)
    throttle.failed("a")
    clock.advance(1)
    throttle.failed("a")  # three within the window, at 10, 15 and 16
    wait = throttle.retry_after("a")
    clock.advance(3.5)
    assert throttle.retry_after("a") is not None
    clock.advance(0.5)
    assert throttle.retry_after("a") is None  # let in when the one at 10 ages out
    assert wait >= 4  # Retry-After never promises less than the refusal lasts


def test_retry_after_is_when_the_oldest_counted_failure_ages_out_not_the_newest():
    clock = Clock()
    throttle = FailureThrottle(clock, limit=3, window=60.0)
    for at in (0, 30, 50):
        clock.advance(at - clock.seconds())
        throttle.failed("a")
    assert throttle.retry_after("a") == 10  # the failure at 0 ages out at 60
    clock.advance(9.5)
    assert throttle.retry_after("a") == 1
    clock.advance(0.5)
    assert throttle.retry_after("a") is None  # let in exactly when Retry-After said


def test_the_oldest_addresses_are_forgotten_beyond_the_limit_of_addresses():
    throttle = FailureThrottle(Clock(), limit=1, window=60.0, max_addresses=2)
    throttle.failed("a")
    throttle.failed("b")
    throttle.failed("a")  # a is now the most recent
    throttle.failed("c")
    assert throttle.retry_after("b") is None
    assert throttle.retry_after("a") == 60 and throttle.retry_after("c") == 60


def test_an_explicit_token_wins_and_nothing_is_written(tmp_path):
    state = str(tmp_path / "state.json")
    assert load_or_create_token("explicit-token-0123456789", None, state) == "explicit-token-0123456789"
    assert os.listdir(tmp_path) == []


def test_a_generated_token_is_written_privately_beside_the_state_file_and_reused(tmp_path):
    state = str(tmp_path / "data" / "state.json")
    token = load_or_create_token(None, None, state)
    path = tmp_path / "data" / "admin_token"
    assert path.read_text() == token + "\n" and len(token) >= 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_token(None, None, state) == token
    assert load_or_create_token(None, None, str(tmp_path / "other" / "state.json")) != token


def test_a_named_token_file_is_read_and_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("  a-token-of-sixteen-or-more \n")
    assert load_or_create_token(None, str(path), str(tmp_path / "state.json")) == "a-token-of-sixteen-or-more"


def test_a_token_file_without_a_usable_token_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="no usable token"):
        load_or_create_token(None, str(path), str(tmp_path / "state.json"))
    assert path.read_text() == "short\n"  # never overwritten


def from_peer(peer, forwarded_for=None):
    request = DummyRequest([b"status"])
    request.client = IPv4Address("TCP", peer, 40000)
    request.isSecure = lambda: False  # what twisted.web's Request has and DummyRequest lacks
    if forwarded_for:
        request.requestHeaders.setRawHeaders(b"x-forwarded-for", [forwarded_for])
    return request


def test_failures_are_counted_against_the_trusted_client_address_not_the_reverse_proxy():
    throttle = FailureThrottle(Clock(), limit=2, trust=parse_forward_trust("127.0.0.1"))
    guesser, admin = from_peer("127.0.0.1", b"6.6.6.6"), from_peer("127.0.0.1", b"10.1.1.1")
    for _ in range(2):
        throttle.failed(throttle.address_of(guesser))
    assert throttle.retry_after(throttle.address_of(guesser)) == 60
    assert throttle.retry_after(throttle.address_of(admin)) is None  # behind the same nginx
    # A peer that is not trusted is its own address, whatever it writes in X-Forwarded-For.
    assert throttle.address_of(from_peer("203.0.113.5", b"10.1.1.1")) == "203.0.113.5"
    assert FailureThrottle(Clock()).address_of(guesser) == "127.0.0.1"  # no trust: the TCP peer
