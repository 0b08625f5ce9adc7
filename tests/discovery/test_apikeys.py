"""Where the caller's API key is read from, and how logs name it."""

import pytest
from twisted.web.http_headers import Headers

from blyanproxy.core.errors import ProxyError
from blyanproxy.discovery.apikeys import api_key_of, key_id


@pytest.mark.parametrize(
    "headers, key",
    [
        ({}, None),
        ({b"X-C3-API-KEY": [b"abc"]}, b"abc"),
        ({b"Authorization": [b"Bearer abc"]}, b"abc"),
        ({b"Authorization": [b"bearer  abc "]}, b"abc"),
        ({b"X-C3-API-KEY": [b"one"], b"Authorization": [b"Bearer two"]}, b"one"),
        ({b"Authorization": [b"Basic dXNlcjpwdw=="]}, None),
    ],
)
def test_key_sources(headers, key):
    assert api_key_of(Headers(headers)) == key


@pytest.mark.parametrize("value", [b"", b"a b", b"k\x00", b"x" * 513, "é".encode()])
def test_unusable_keys_are_refused_without_an_api_call(value):
    with pytest.raises(ProxyError) as raised:
        api_key_of(Headers({b"X-C3-API-KEY": [value]}))
    assert (raised.value.status, raised.value.code) == (401, "invalid_api_key")


def test_key_id_is_short_stable_and_not_the_key():
    assert key_id(b"secret-key") == key_id(b"secret-key") != key_id(b"other-key")
    assert "secret" not in key_id(b"secret-key") and len(key_id(b"k")) == 14
