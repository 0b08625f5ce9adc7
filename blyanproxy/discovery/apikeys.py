"""The caller's API key (c3 style): where it is read from, and the only name logs give it."""

from __future__ import annotations

import hashlib

from blyanproxy.core import ProxyError

#: Keys longer than this are refused without asking the workloads API.
MAX_KEY_LENGTH = 512


def _acceptable(key: bytes) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and all(0x21 <= byte <= 0x7E for byte in key)


def api_key_of(headers) -> bytes | None:
    """The API key a request carries, or ``None`` when it carries none.

    ``X-C3-API-KEY`` first, else ``Authorization: Bearer <key>`` (the scheme in
    any case). A key that is empty, too long or not printable ASCII is refused
    with 401 before any API call.
    """
    values = headers.getRawHeaders(b"x-c3-api-key")
    if values:
        key = values[0].strip()
    else:
        authorization = headers.getRawHeaders(b"authorization")
        if not authorization:
            return None
        scheme, _, key = authorization[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        key = key.strip()
    if not _acceptable(key):
        raise ProxyError(401, "invalid_api_key", "the API key is not valid")
    return key


def key_id(key: bytes) -> str:
    """A short, stable name for a key in logs and errors: never the key itself."""
    return "key-" + hashlib.sha256(key).hexdigest()[:10]


def missing_key_error() -> ProxyError:
    """The 401 for a request that needs a key and has none (c3's wording)."""
    return ProxyError(401, "missing_api_key", "Missing API key (use X-C3-API-KEY header or Authorization Bearer)")
