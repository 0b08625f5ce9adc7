"""The live fleet of one process: leases on nodes (``Balancer``), admin edits kept in step with the
store (``FleetKeeper``) and active health checks (``HealthMonitor``)."""

from __future__ import annotations

from blyanproxy.fleet.balancer import Balancer, Lease, LeaseMaker, LeasePool, check_model
from blyanproxy.fleet.health import HealthMonitor, probe_client
from blyanproxy.fleet.keeper import FleetKeeper
from blyanproxy.fleet.loadmonitor import LoadMonitor

__all__ = [
    "Balancer",
    "FleetKeeper",
    "HealthMonitor",
    "Lease",
    "LeaseMaker",
    "LeasePool",
    "LoadMonitor",
    "check_model",
    "probe_client",
]
