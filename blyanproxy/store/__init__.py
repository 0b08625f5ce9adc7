"""Where the fleet is kept: the JSON state file, etcd, or memory (each a ``core.StateStore``)."""

from __future__ import annotations

from blyanproxy.store.etcdclient import EtcdAccess
from blyanproxy.store.etcdstore import EtcdStore
from blyanproxy.store.jsonfile import JsonFileStore, MemoryStore
from blyanproxy.store.storeurl import EtcdLocation, parse_state_store

__all__ = [
    "EtcdAccess",
    "EtcdLocation",
    "EtcdStore",
    "JsonFileStore",
    "MemoryStore",
    "parse_state_store",
]
