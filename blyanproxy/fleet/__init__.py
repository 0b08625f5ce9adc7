"""The live fleet of one process: leases on nodes (``Balancer``), admin edits kept in step with the
store (``FleetKeeper``), active health checks (``HealthMonitor``) and the queue for node slots
(``SlotQueue``)."""

from __future__ import annotations

from blyanproxy.fleet.admission import Caller, QueueObserver, SlotQueue, Ticket
from blyanproxy.fleet.balancer import Balancer, Lease, LeaseMaker, LeasePool, check_model
from blyanproxy.fleet.health import HealthMonitor, probe_client
from blyanproxy.fleet.keeper import FleetKeeper
from blyanproxy.fleet.loadmonitor import LoadMonitor

__all__ = [
    "Balancer",
    "Caller",
    "FleetKeeper",
    "HealthMonitor",
    "Lease",
    "LeaseMaker",
    "LeasePool",
    "LoadMonitor",
    "QueueObserver",
    "SlotQueue",
    "Ticket",
    "check_model",
    "probe_client",
]
