"""Per-API-key workload discovery (c3 style): API keys, the workloads API, the per-key cache and keyed pools."""

from __future__ import annotations

from blyanproxy.discovery.apikeys import api_key_of, key_id, missing_key_error
from blyanproxy.discovery.directory import KeyRecord, WorkloadDirectory
from blyanproxy.discovery.keycache import CacheLimits
from blyanproxy.discovery.nodeallow import NodeAllowList, parse_node_allow
from blyanproxy.discovery.pools import KeyedBalancer
from blyanproxy.discovery.workloads import NodeAddressing
from blyanproxy.discovery.workloadsapi import workloads_client

__all__ = [
    "CacheLimits",
    "KeyRecord",
    "KeyedBalancer",
    "NodeAddressing",
    "NodeAllowList",
    "WorkloadDirectory",
    "api_key_of",
    "key_id",
    "missing_key_error",
    "parse_node_allow",
    "workloads_client",
]
