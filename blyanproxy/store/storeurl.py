"""The ``STATE_STORE`` setting: the JSON state file, or an etcd endpoint and key prefix."""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs


@attrs.frozen
class EtcdLocation:
    """Where a shared fleet lives: etcd's gateway base URL and the key prefix (ending in ``/``)."""

    base_url: str
    prefix: bytes


def parse_state_store(text: str) -> EtcdLocation | None:
    """``file`` → ``None`` (the JSON file); ``etcd://host[:port]/prefix`` → its ``EtcdLocation``."""
    if text == "file":
        return None
    parts = urlsplit(text)
    if parts.scheme != "etcd" or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ValueError("expected file or etcd://host:port/prefix")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError("the etcd port must be a number from 1 to 65535") from None
    path = parts.path.strip("/")
    if not path:
        raise ValueError("name a key prefix: etcd://host:port/prefix")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return EtcdLocation(base_url=f"http://{host}:{port}", prefix=f"/{path}/".encode())
