"""The ``STATE_STORE`` setting: the JSON state file, or an etcd endpoint and key prefix."""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

#: ``STATE_STORE`` scheme -> the scheme of etcd's JSON gateway.
_SCHEMES = {"etcd": "http", "etcd+https": "https"}


@attrs.frozen
class EtcdLocation:
    """Where a shared fleet lives: etcd's gateway base URL (http or https) and the key prefix (ending in ``/``)."""

    base_url: str
    prefix: bytes


def parse_state_store(text: str) -> EtcdLocation | None:
    """``file`` → ``None`` (the JSON file); ``etcd://host[:port]/prefix`` (plain HTTP) or
    ``etcd+https://host[:port]/prefix`` (TLS) → its ``EtcdLocation``.

    Credentials never go in the URL (``ETCD_USER`` and ``ETCD_PASSWORD_FILE``
    do): one there is refused, and the message does not repeat it.
    """
    if text == "file":
        return None
    parts = urlsplit(text)
    if "@" in parts.netloc:
        raise ValueError("credentials do not go in STATE_STORE: set ETCD_USER and ETCD_PASSWORD_FILE")
    if parts.scheme not in _SCHEMES or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("expected file, etcd://host:port/prefix or etcd+https://host:port/prefix")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError("the etcd port must be a number from 1 to 65535") from None
    path = parts.path.strip("/")
    if not path:
        raise ValueError(f"name a key prefix: {parts.scheme}://host:port/prefix")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return EtcdLocation(base_url=f"{_SCHEMES[parts.scheme]}://{host}:{port}", prefix=f"/{path}/".encode())
