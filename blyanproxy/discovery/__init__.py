"""discovery."""

from __future__ import annotations

from blyanproxy.discovery.apikeys import api_key_of, missing_key_error
from blyanproxy.discovery.directory import WorkloadDirectory
from blyanproxy.discovery.keycache import CacheLimits
from blyanproxy.discovery.pools import KeyedBalancer
from blyanproxy.discovery.workloads import NodeAddressing
from blyanproxy.discovery.workloadsapi import workloads_client

__all__ = [
    "CacheLimits",
    "KeyedBalancer",
    "NodeAddressing",
    "WorkloadDirectory",
    "api_key_of",
    "missing_key_error",
    "workloads_client",
]
